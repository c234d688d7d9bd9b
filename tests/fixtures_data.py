"""Tiny REAL-Colon and SUN dataset trees in the real layouts, with real JPEGs, for tests.

Each writer returns the rows a correct reader must produce (what was written, computed here
independently of the readers), so tests can compare against it. Import with
``from fixtures_data import write_realcolon, write_sun``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

FRAME_SIZE = (64, 48)  # width, height
EXPECTED_COLUMNS = [
    "video_id",
    "lesion_id",
    "frame_id",
    "frame_path",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "width",
    "height",
    "size_mm",
]


def voc_xml(filename: str, width: int, height: int, objects: Sequence[tuple[str, Sequence[float]]]) -> str:
    """A REAL-Colon VOC annotation: ``objects`` are (lesion unique_id, (xmin, ymin, xmax, ymax))."""
    parts = [
        f"""<annotation>
    <version_fmt>1.0</version_fmt>
    <folder>{filename.rsplit("_", 1)[0]}_frames</folder>
    <filename>{filename}</filename>
    <source>
        <database>cosmoimd</database>
        <release>v1.0_20230228</release>
    </source>
    <size>
        <width>{width}</width>
        <height>{height}</height>
        <depth>3</depth>
    </size>"""
    ]
    for box_id, (lesion, (xmin, ymin, xmax, ymax)) in enumerate(objects, start=1):
        parts.append(f"""    <object>
        <name>lesion</name>
        <unique_id>{lesion}</unique_id>
        <box_id>{box_id}</box_id>
        <bndbox>
            <xmin>{xmin}</xmin>
            <xmax>{xmax}</xmax>
            <ymin>{ymin}</ymin>
            <ymax>{ymax}</ymax>
        </bndbox>
    </object>""")
    parts.append("</annotation>\n")
    return "\n".join(parts)


def write_jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A small noisy colour JPEG of the given size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(40, 200, size=3)
    img = np.clip(base + rng.normal(0, 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")


def random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A box of at least 4x4 pixels inside a ``width`` x ``height`` frame."""
    w, h = int(rng.integers(4, width // 2)), int(rng.integers(4, height // 2))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return x, y, x + w, y + h


def write_realcolon(
    root: Path,
    sizes_per_video: Sequence[Sequence[float]],
    frames_per_lesion: int = 2,
    negatives: int = 2,
    two_lesion_frame: bool = True,
    site: int = 1,
    frame_size: tuple[int, int] = FRAME_SIZE,
    frame_pad: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Write a REAL-Colon tree: video ``v`` has one lesion per size in ``sizes_per_video[v]``.

    Per video: ``frames_per_lesion`` frames of each lesion alone, one frame showing its first two lesions
    (if ``two_lesion_frame``), and ``negatives`` frames without lesions (half before, half after). Frame
    files are zero-padded to ``frame_pad`` digits (XMLs are not). Returns the expected manifest rows.
    """
    rng = np.random.default_rng(seed)
    width, height = frame_size
    root.mkdir(parents=True, exist_ok=True)
    lesion_rows, video_rows, expected = [], [], []
    for v, sizes in enumerate(sizes_per_video, start=1):
        video = f"{site:03d}-{v:03d}"
        lesions = [f"{video}_{k}" for k in range(1, len(sizes) + 1)]
        plan = [[] for _ in range(negatives // 2)]
        plan += [[lesion] for lesion in lesions for _ in range(frames_per_lesion)]
        if two_lesion_frame and len(lesions) >= 2:
            plan.append(lesions[:2])
        plan += [[] for _ in range(negatives - negatives // 2)]
        for t, shown in enumerate(plan, start=1):
            stem = f"{video}_{t:0{frame_pad}d}"
            write_jpeg(root / f"{video}_frames" / f"{stem}.jpg", width, height, rng)
            objects = [(lesion, random_box(rng, width, height)) for lesion in shown]
            xml = root / f"{video}_annotations" / f"{video}_{t}.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            xml.write_text(voc_xml(f"{stem}.jpg", width, height, objects))
            for lesion, box in objects:
                expected.append(
                    [
                        video,
                        lesion,
                        stem,
                        f"{video}_frames/{stem}.jpg",
                        *box,
                        width,
                        height,
                        float(sizes[lesions.index(lesion)]),
                    ]
                )
        lesion_rows += [
            {
                "unique_object_id": lesion,
                "unique_video_name": video,
                "size [mm]": size,
                "site": "ascending",
                "histology_extended": "tubular adenoma",
                "histology_class": "AD",
            }
            for lesion, size in zip(lesions, sizes)
        ]
        video_rows.append(
            {
                "unique_video_name": video,
                "age": 60,
                "sex": "F",
                "endoscope_brand": "Olympus",
                "fps": 30.0,
                "num_frames": len(plan),
                "num_lesions": len(lesions),
                "bbps": 7,
            }
        )
    lesion_columns = [
        "unique_object_id",
        "unique_video_name",
        "size [mm]",
        "site",
        "histology_extended",
        "histology_class",
    ]
    pd.DataFrame(lesion_rows, columns=lesion_columns).to_csv(root / "lesion_info.csv", index=False)
    pd.DataFrame(video_rows).to_csv(root / "video_info.csv", index=False)
    return pd.DataFrame(expected, columns=EXPECTED_COLUMNS)


def sun_image_name(case: int, i: int) -> str:
    """A SUN frame file name (long clinical prefix, 4-digit image number)."""
    return f"case_M_20181001100941_0U6237210010934{case}_1_005_001-1_a2_ayy_image{i:04d}.jpg"


def write_sun(
    root: Path,
    sizes: Sequence[float],
    frames_per_case: int = 2,
    two_box_line: bool = True,
    frame_size: tuple[int, int] = (80, 60),
    seed: int = 0,
) -> tuple[Path, pd.DataFrame]:
    """Write a SUN tree with one case per size, and ``sizes.csv`` beside it.

    Odd cases name frames by a relative POSIX path, even cases by a Windows path; the first line of
    case 1 has two boxes (if ``two_box_line``). Returns (sizes CSV path, expected manifest rows).
    """
    rng = np.random.default_rng(seed)
    width, height = frame_size
    (root / "annotation_txt").mkdir(parents=True, exist_ok=True)
    expected = []
    for n, size in enumerate(sizes, start=1):
        lines = []
        for i in range(1, frames_per_case + 1):
            name = sun_image_name(n, i)
            write_jpeg(root / f"case{n}" / name, width, height, rng)
            n_boxes = 2 if (two_box_line and n == 1 and i == 1) else 1
            boxes = [random_box(rng, width, height) for _ in range(n_boxes)]
            path = f"case{n}/{name}" if n % 2 else f"D:\\SUN\\case{n}\\{name}"
            lines.append(path + "".join(f" {a},{b},{c},{d},0" for a, b, c, d in boxes))
            expected += [
                [f"case{n}", f"case{n}", name[:-4], f"case{n}/{name}", *box, width, height, float(size)]
                for box in boxes
            ]
        (root / "annotation_txt" / f"case{n}.txt").write_text("\n".join(lines) + "\n\n")
    sizes_csv = root.parent / f"{root.name}_sizes.csv"
    pd.DataFrame({"case": range(1, len(sizes) + 1), "size_mm": list(sizes)}).to_csv(sizes_csv, index=False)
    return sizes_csv, pd.DataFrame(expected, columns=EXPECTED_COLUMNS)

"""Hand-made features of the crops the models see: box geometry, colour, brightness, texture band energies.

The classical baselines (:mod:`fsg_endo.engine.baselines`) and the dataset card's single-cue baselines
read these. Crops come from the same steps as the model's (:func:`fsg_endo.data.pipeline.crop_transforms`),
so a feature describes exactly the pixels a model is given.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from monai.transforms import Compose

from fsg_endo.data.pipeline import crop_transforms, rows_to_items, user_errors

BAND_SIGMAS = (1.0, 2.0, 4.0)  # difference-of-Gaussians bands, in pixels of the crop
# Feature names by cue; "box" is computed from the manifest, the others from the crop.
CUES: dict[str, tuple[str, ...]] = {
    "box": ("log_box_width", "log_box_height", "log_box_area"),
    "colour": tuple(f"{region}_{c}" for region in ("centre", "border") for c in "rgb"),
    "brightness": ("centre_luma", "border_luma", "centre_luma_std", "fov_share"),
    "texture": tuple(f"{region}_band{k}" for region in ("centre", "border") for k in range(len(BAND_SIGMAS))),
}


def box_geometry(rows: pd.DataFrame) -> pd.DataFrame:
    """Log of box width, height and area relative to the frame (one row per manifest row)."""
    w = (rows["xmax"] - rows["xmin"]).clip(lower=1) / rows["width"]
    h = (rows["ymax"] - rows["ymin"]).clip(lower=1) / rows["height"]
    return pd.DataFrame(
        {"log_box_width": np.log(w), "log_box_height": np.log(h), "log_box_area": np.log(w * h)}, index=rows.index
    )


def _regions(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the crop's centre (the middle half of the box) and its border (the context margin)."""
    u = np.abs(np.arange(size) + 0.5 - size / 2.0) / size
    d = np.maximum(u[:, None], u[None, :])
    return d < 0.125, d >= 0.25


def image_statistics(crop: np.ndarray) -> list[float]:
    """Colour, brightness and texture of one RGB uint8 crop, in the order of the crop cues of :data:`CUES`."""
    image = crop.astype(np.float32) / 255.0
    centre, border = _regions(image.shape[0])
    inside = image.max(axis=2) > 0  # pixels inside the endoscope's field of view (the rest is masked black)
    border = border & inside if (border & inside).any() else border
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    colour = [*image[centre].mean(axis=0), *image[border].mean(axis=0)]
    brightness = [
        float(luma[centre].mean()),
        float(luma[border].mean()),
        float(luma[centre].std()),
        float(inside.mean()),
    ]
    texture, previous = [[], []], luma
    for sigma in BAND_SIGMAS:
        blurred = cv2.GaussianBlur(luma, (0, 0), sigma)
        band = (previous - blurred) ** 2
        for out, region in zip(texture, (centre, border)):
            out.append(float(np.log(band[region].mean() + 1e-8)))
        previous = blurred
    return [float(v) for v in colour] + brightness + texture[0] + texture[1]


def crop_features(
    rows: pd.DataFrame,
    root: str | Path,
    *,
    image_size: int = 64,
    context: float = 0.5,
    fov_mask: bool = True,
    source: str = "frames",
    workers: int = 1,
) -> pd.DataFrame:
    """Every cue of :data:`CUES` for each manifest row (same index), from the crops a model would see."""
    crop = Compose(crop_transforms(image_size, context, fov_mask, source))
    items = rows_to_items(rows, root, source)
    with user_errors(), ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        stats = list(pool.map(lambda item: image_statistics(crop(item)["image"]), items))
    names = [name for cue, names in CUES.items() if cue != "box" for name in names]
    appearance = pd.DataFrame(
        np.asarray(stats, dtype=float).reshape(len(rows), len(names)), columns=names, index=rows.index
    )
    return pd.concat([box_geometry(rows), appearance], axis=1)

"""Classical baselines: crop features, fit on training rows, scored with the task metrics; baseline arms as runs."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from fsg_endo.data.crop_features import CUES, box_geometry, image_statistics
from fsg_endo.data.sizes import size_class2, size_class3
from fsg_endo.data.splits import make_splits
from fsg_endo.engine.baselines import baseline_of, evaluate_baseline
from fsg_endo.engine.schema import Data
from fsg_endo.engine.tasks import get_task

CROP_NAMES = [n for cue, names in CUES.items() if cue != "box" for n in names]


def _manifest(box_side: np.ndarray, size_mm: np.ndarray) -> pd.DataFrame:
    """5 frames per lesion, 10 videos in 5 folds; boxes of ``box_side`` px in 256 px frames."""
    lesion = np.arange(len(box_side)) // 5
    return pd.DataFrame(
        {
            "video_id": [f"v{k % 10}" for k in lesion],
            "lesion_id": [f"l{k}" for k in lesion],
            "frame_id": [f"v{k % 10}_{i}" for i, k in enumerate(lesion)],
            "fold": (lesion % 10) // 2,
            "xmin": 10,
            "ymin": 10,
            "xmax": 10 + box_side,
            "ymax": 10 + box_side,
            "width": 256,
            "height": 256,
            "size_mm": size_mm,
            "size_class3": size_class3(size_mm),
            "size_class2": size_class2(size_mm),
        }
    )


def _box_baseline(manifest: pd.DataFrame, task: str) -> dict[str, float]:
    splits = make_splits(manifest, test_fold=0, val_fold=1)
    features = {name: box_geometry(rows) for name, rows in splits.items()}
    return evaluate_baseline(get_task(task), splits, features, ["box"])[0]


def test_box_baseline_detects_informative_and_useless_boxes() -> None:
    rng = np.random.default_rng(0)
    size = np.repeat(rng.choice([3.0, 7.0, 14.0], 120), 5)
    informative = _box_baseline(_manifest(np.round(size * 6) + rng.integers(0, 3, 600), size), "size_class3")
    assert informative["test/balanced_accuracy"] > 0.95 and informative["lesion/test/balanced_accuracy"] > 0.95
    useless = _box_baseline(_manifest(rng.integers(6, 90, 600), size), "size_class3")
    assert useless["lesion/test/balanced_accuracy"] < 0.6 and useless["test/balanced_accuracy"] < 0.5


def test_regression_baseline_is_ridge_on_log_size_scored_per_lesion() -> None:
    rng = np.random.default_rng(1)
    size = np.repeat(np.exp(rng.uniform(0.0, 3.0, 120)), 5)
    manifest = _manifest(np.round(size * 4 * rng.uniform(0.7, 1.4, 600)) + 6, size)
    got = _box_baseline(manifest, "size_regression")
    # independently: scaler + ridge on log size, lesion = mean predicted mm over its frames
    splits = make_splits(manifest, test_fold=0, val_fold=1)
    x_train, x_test = box_geometry(splits["train"]).to_numpy(), box_geometry(splits["test"]).to_numpy()
    scaler = StandardScaler().fit(x_train)
    ridge = Ridge(alpha=1.0).fit(scaler.transform(x_train), np.log(splits["train"]["size_mm"]))
    test = splits["test"].assign(pred=np.exp(ridge.predict(scaler.transform(x_test))))
    lesions = test.groupby("lesion_id").agg(pred=("pred", "mean"), size=("size_mm", "first"))
    assert got["lesion/test/mae"] == pytest.approx(float(np.mean(np.abs(lesions["pred"] - lesions["size"]))))
    assert got["test/mae"] == pytest.approx(float(np.mean(np.abs(test["pred"] - test["size_mm"]))))
    # its triclass numbers come from a class-balanced logistic regression fit beside the ridge
    logistic = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0)
    logistic.fit(scaler.transform(x_train), splits["train"]["size_class3"])
    frame_pred = logistic.predict(scaler.transform(x_test))
    assert got["test/cls3_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test["size_class3"], frame_pred))
    assert {"val/mae", "lesion/val/mae", "lesion/test/cls3_balanced_accuracy", "lesion/test/cls2_auroc"} <= set(got)


def test_image_statistics_read_colour_brightness_and_texture() -> None:
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[...] = (200, 100, 50)
    flat[16:48, 16:48] = (40, 160, 220)
    stats = dict(zip(CROP_NAMES, image_statistics(flat)))
    assert [stats[f"centre_{c}"] for c in "rgb"] == pytest.approx([40 / 255, 160 / 255, 220 / 255], abs=1e-5)
    assert [stats[f"border_{c}"] for c in "rgb"] == pytest.approx([200 / 255, 100 / 255, 50 / 255], abs=1e-5)
    assert stats["centre_luma_std"] == pytest.approx(0.0, abs=1e-6) and stats["fov_share"] == 1.0
    fine = np.kron((np.indices((32, 32)).sum(axis=0) % 2), np.ones((2, 2)))  # 2 px checkerboard
    coarse = np.kron((np.indices((8, 8)).sum(axis=0) % 2), np.ones((8, 8)))
    fine_stats, coarse_stats = (
        {
            n: v
            for n, v in zip(CROP_NAMES, image_statistics(np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)))
        }
        for img in (fine, coarse)
    )
    assert fine_stats["centre_band0"] > coarse_stats["centre_band0"] + 1.0
    # energy shifts to the coarser bands as the pattern grows
    shift = {
        name: stats["centre_band2"] - stats["centre_band0"]
        for name, stats in (("fine", fine_stats), ("coarse", coarse_stats))
    }
    assert shift["coarse"] > shift["fine"] + 1.0


def test_baseline_names() -> None:
    assert baseline_of("baseline_box") == "box" and baseline_of("baseline_appearance") == "appearance"
    assert baseline_of("fsg_gr") is None and baseline_of("baseline_other") is None


def test_baseline_arms_are_child_runs_with_the_model_metric_names(tmp_path, data_cache, smoke_store):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        [
            "--exp",
            "regularization_sweep",
            "--smoke",
            "--set",
            "sweep.train_fractions=[1.0]",
            "--set",
            "sweep.regularizers=[baseline_box,baseline_appearance]",
            "--set",
            "sweep.executor=sequential",
            "--set",
            "model.weights=models:/fsg_endo_mae_backbone/latest",  # the sweep's own default, which smoke unsets
        ],  # children of seconds: Ray's start would dominate
        tmp_path,
        data_cache,
        uri,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("regularization_sweep").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("regularizer") == "sweep")
    children = {
        r.data.tags["regularizer"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"baseline_box", "baseline_appearance"}
    assert client.get_experiment_by_name("pretrain_mae") is None  # the sweep's backbone: no baseline reads it
    store = mlflow.MlflowClient(tracking_uri=smoke_store["uri"])
    trained = store.search_runs([store.get_experiment_by_name("polyp_size_fsg").experiment_id])
    model_names = {k for k in trained[0].data.metrics if k.startswith(("test/", "lesion/test/", "val/", "lesion/val/"))}
    for run in children.values():
        assert run.info.status == "FINISHED"
        assert model_names <= set(run.data.metrics)
        assert np.isfinite(run.data.metrics["lesion/test/mae"])
    assert (
        children["baseline_box"].data.metrics["lesion/test/mae"]
        != children["baseline_appearance"].data.metrics["lesion/test/mae"]
    )


def test_results_table_shows_the_appearance_baseline(smoke_store):
    assert "appearance baseline lesion/test" in smoke_store["stdout"]


def test_a_regenerated_dataset_gets_a_new_manifest(tmp_path, monkeypatch):
    """The manifest cache follows the dataset's version, not only its folder (a stale manifest names old frames)."""
    from fsg_endo.engine import prepare

    built = []
    monkeypatch.setenv("FSG_ENDO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "build_manifest", lambda *a, **k: built.append(1) or pd.DataFrame({"x": [1]}))
    monkeypatch.setattr(
        prepare,
        "write_manifest",
        lambda df, path: path.parent.mkdir(parents=True, exist_ok=True) or path.write_text("x\n1\n"),
    )
    root = tmp_path / "ds"
    root.mkdir()
    (root / "synthetic.json").write_text('{"params": {"version": 1}}')
    data = Data(manifest=None, source="synthetic", sizes=None, folds=5)
    first = prepare.manifest_path(data, root, 0)
    assert prepare.manifest_path(data, root, 0) == first and len(built) == 1  # cached
    (root / "synthetic.json").write_text('{"params": {"version": 2}}')
    assert prepare.manifest_path(data, root, 0) != first and len(built) == 2

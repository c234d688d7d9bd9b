"""In-domain MAE pretraining through the one training loop, and fine-tuning from its logged encoder."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures_runs import in_process, only_run

from fsg_endo.engine.prepare import prepare_splits
from fsg_endo.engine.recipe import build_for
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config

FINE_TUNE = ["--exp", "polyp_size_fsg", "--smoke", "--set", "model.weights=models:/fsg_endo_mae_backbone/latest"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> dict:
    """A smoke sizing run naming the project's backbone in an empty store: it pretrains it first, then fine-tunes."""
    work = tmp_path_factory.mktemp("pretrain")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        assert in_process([*FINE_TUNE, "--set", f"checkpoint.dir={work}"], work, data_cache, uri) == 0
    client, run = only_run(uri, "pretrain_mae")
    return {"uri": uri, "work": work, "client": client, "run": run, "said": said.getvalue(), "cache": data_cache}


def test_a_run_naming_the_projects_backbone_pretrains_it_once_and_reuses_it(pretrained):
    line = [x for x in pretrained["said"].splitlines() if "pretraining it first" in x]
    assert len(line) == 1 and "fsg_endo_mae_backbone" in line[0] and "experiment pretrain_mae" in line[0]
    client, uri, work = pretrained["client"], pretrained["uri"], pretrained["work"]
    (sizing,) = client.search_runs([client.get_experiment_by_name("polyp_size_fsg").experiment_id])
    assert sizing.info.status == "FINISHED" and sizing.data.params["model.weights_source"]
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        assert in_process([*FINE_TUNE, "--set", "optim.epochs=1"], work, pretrained["cache"], uri) == 0
    assert "pretraining it first" not in said.getvalue()
    only_run(uri, "pretrain_mae")  # still the one pretraining run


def test_pretraining_logs_its_loss_pictures_and_the_registered_encoder(pretrained):
    client, run = pretrained["client"], pretrained["run"]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(history) == 2 and all(0 < m.value < 10 for m in history)
    assert "test/loss" in run.data.metrics and "lesion/test/loss" not in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/reconstructions_epoch_001.png", "plots/reconstructions_epoch_002.png"} <= plots
    assert "plots/confusion_test.png" not in plots
    version = client.get_model_version("fsg_endo_mae_backbone", "1")
    assert version.run_id == run.info.run_id


def test_a_sizing_run_fine_tunes_from_the_logged_encoder_tensor_for_tensor(pretrained):
    best = Path(pretrained["run"].data.tags["checkpoint_dir"]) / "best.pt"
    encoder = {
        k[len("vit.") :]: v for k, v in torch.load(best, weights_only=True)["model"].items() if k.startswith("vit.")
    }
    assert encoder and not any(k.startswith("decoder") for k in encoder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", pretrained["uri"])
        mp.chdir(pretrained["work"])
        from fsg_endo.engine.backbones import fetch_backbones

        cfg = load_config("polyp_size_fsg", ["model.weights=models:/fsg_endo_mae_backbone/1"], smoke=True)
        fetch_backbones([cfg], pretrained["uri"])
        model = build_for(cfg, get_task("size_regression"))
    state = model.vit.state_dict()
    loaded = [k for k in encoder if not k.startswith("heads") and k in state]
    assert len(loaded) >= len(encoder) - 2  # every encoder tensor but the (identity) head
    for key in loaded:
        assert torch.equal(state[key], encoder[key]), key


def test_the_corpus_is_crops_of_its_own_pool_with_no_size(data_cache, monkeypatch):
    monkeypatch.setenv("FSG_ENDO_CACHE", str(data_cache))
    pool = prepare_splits(load_config("pretrain_mae", [], smoke=True))
    sizing = prepare_splits(load_config("polyp_size_fsg", [], smoke=True))
    assert pool.root != sizing.root  # another generator seed: another set of videos
    for name, rows in pool.splits.items():
        assert rows["size_mm"].isna().all() and (rows["size_class3"] == -1).all(), name
        assert rows["lesion_id"].is_unique
        crops_per_frame = rows.groupby("frame_path").size()
        assert (crops_per_frame == 2).all()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["regularizer=fsg_gr"], "regularizer: none"),
        (["data.synthetic_seed=null"], "data.synthetic_seed"),
        (["model.box_features=true", "model.size_head=linear"], "model.box_features"),
    ],
)
def test_a_pretraining_config_that_cannot_pretrain_is_one_line(overrides, named):
    with pytest.raises(FsgEndoError, match=named) as err:
        load_config("pretrain_mae", overrides)
    assert "\n" not in str(err.value)


def test_pretraining_keys_are_refused_for_the_sizing_task():
    with pytest.raises(FsgEndoError, match="pretrain.mask_ratio") as err:
        load_config("polyp_size_fsg", ["pretrain.mask_ratio=0.5"])
    assert "\n" not in str(err.value)


def test_pretraining_on_a_folder_of_unlabelled_frames(tmp_path, data_cache):
    frames = tmp_path / "frames"
    rng = np.random.default_rng(0)
    for video in range(4):
        (frames / f"patient{video}").mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(frames / f"patient{video}" / f"{i:04d}.png"), rng.integers(0, 255, (96, 128, 3), np.uint8))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--exp", "pretrain_mae", "--smoke", "--data-root", str(frames), "--set", "tracking.register_model=null"]
    assert in_process(args, tmp_path, data_cache, uri) == 0
    client, run = only_run(uri, "pretrain_mae")
    assert run.data.params["data.source"] == "frames" and "test/loss" in run.data.metrics
    cfg = load_config("pretrain_mae", ["data.source=frames", f"data.root={frames}"], smoke=True)
    splits = prepare_splits(cfg).splits
    videos = [set(rows["video_id"]) for rows in splits.values()]
    assert set().union(*videos) == {f"patient{v}" for v in range(4)}
    assert all(a.isdisjoint(b) for i, a in enumerate(videos) for b in videos[i + 1 :])  # whole videos per split
    side = (splits["train"]["xmax"] - splits["train"]["xmin"]) / 96
    assert side.between(0.05 - 0.02, 0.4 + 0.02).all()  # pretrain.crop_sides, relative to the shorter side


def test_the_projects_backbones_are_made_by_shipped_experiments_on_pools_no_sizing_data_uses():
    from fsg_endo.experiment.own_backbones import named_model, producers

    made = producers()
    assert made["fsg_endo_mae_backbone"] == ("pretrain_mae", None)
    assert made["fsg_endo_mae_backbone_ti"] == ("pretrain_mae", "paper")
    assert made["fsg_endo_sim_backbone"] == ("pretrain_sim", None)
    sizing = load_config("polyp_size_fsg", [])
    sizing_seed = sizing.data.synthetic_seed if sizing.data.synthetic_seed is not None else sizing.seed
    for exp in ("pretrain_mae", "pretrain_sim"):
        assert load_config(exp, []).data.synthetic_seed not in (None, sizing_seed)
    sim = load_config("pretrain_sim", [])
    assert sim.task == sizing.task and sim.regularizer == "none" and sim.model == sizing.model  # the main job's ViT
    assert [named_model(w) for w in ("models:/a/1", "models:/a@best", "runs:/x/y", None)] == ["a", "a", None, None]


def test_the_sweep_fine_tunes_the_in_domain_backbone_and_scratch_is_one_key():
    from fsg_endo.experiment.sweep import child_configs

    def children(*overrides: str) -> list:
        return list(child_configs(load_config("regularization_sweep", list(overrides))))

    default = children()
    assert {c.regularizer for c in default} >= {"fsg_gr", "fsg_frozen", "layerscale", "none"}
    assert {c.model.weights for c in default} == {"models:/fsg_endo_mae_backbone/latest"}
    assert {c.model.weights for c in children("model.weights=null")} == {None}
    # the study's two sweeps: the arms on the in-domain backbone, fsg_gr from the sim backbone and from scratch
    study = list(child_configs(load_config("regularization_sweep", profile="test_folds")))
    backbones = list(child_configs(load_config("regularization_sweep", profile="backbones")))
    cell = lambda c: (c.data.train_fraction, c.data.test_fold, c.seed)  # noqa: E731
    assert {cell(c) for c in study} == {cell(c) for c in backbones} and len({cell(c) for c in study}) == 3 * 5 * 3
    assert {c.model.weights for c in backbones} == {"models:/fsg_endo_sim_backbone/latest", None}
    assert {c.model.weights for c in study} == {"models:/fsg_endo_mae_backbone/latest"}

"""In-domain MAE pretraining through the one training loop, and fine-tuning from its logged encoder."""

from __future__ import annotations

import pytest
import torch
from fixtures_runs import in_process, only_run

from fsg_endo.engine.prepare import prepare_splits
from fsg_endo.engine.recipe import build_for
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> dict:
    """One smoke pretraining run (pictures every epoch) in its own store."""
    work = tmp_path_factory.mktemp("pretrain")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    args = ["--exp", "pretrain_mae", "--smoke", "--set", "pretrain.picture_every=1", "--set", f"checkpoint.dir={work}"]
    assert in_process(args, work, data_cache, uri) == 0
    client, run = only_run(uri, "pretrain_mae")
    return {"uri": uri, "work": work, "client": client, "run": run}


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
    best = pretrained["work"] / pretrained["run"].info.run_id / "best.pt"
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

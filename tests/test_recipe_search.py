"""Recipe searches as sweeps: named variants, validation folds with the test fold held out, training seeds on
fixed data and folds; the shipped ``recipe_search`` run end to end and read back through ``fsg-endo report``."""

from __future__ import annotations

import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from fixtures_runs import in_process

from fsg_endo.engine.prepare import prepare_splits
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.analysis import at_best_epoch, search_runs
from fsg_endo.experiment.config import CONFIG_DIR, dump_config, load_config, load_config_file
from fsg_endo.experiment.report import report_table
from fsg_endo.experiment.runs import grid_point, run_name
from fsg_endo.experiment.sweep import child_configs

SEARCH = """\
sweep:
  enabled: true
  regularizers: [fsg_gr, baseline_appearance]
  train_fractions: [1.0]
  folds: [1, 2]
  fold_role: validation
  seeds: [3, 4]
  seed_role: training
  variants:
    current: {}
    relw: {loss.main_weights: [1.0, 0.4, 0.2], loss.gate_weights: [1.0, 0.4, 0.2]}
    small: {data.image_size: 96, model.patch_size: 12}
"""


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A config folder of temporary YAMLs; returns a writer ``(name, text)``."""
    monkeypatch.setenv("FSG_ENDO_CONFIG_DIR", str(tmp_path))
    return lambda name, text: (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(text))


def _error(exp: str, overrides=()) -> str:
    with pytest.raises(FsgEndoError) as info:
        load_config(exp, list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_variants_are_an_axis_of_named_override_sets(configs):
    configs("search", SEARCH)
    cfg = load_config("search")
    children = list(child_configs(cfg))
    assert len(children) == 2 * 3 * 2 * 2  # regularizers x variants x folds x seeds
    by_variant = {}
    for child in children:
        by_variant.setdefault(child.sweep.variant, []).append(child)
    assert set(by_variant) == {"current", "relw", "small"}
    assert all(
        c.loss.main_weights == [1.0, 0.4, 0.2] and c.loss.gate_weights == [1.0, 0.4, 0.2] for c in by_variant["relw"]
    )
    assert all((c.data.image_size, c.model.patch_size) == (96, 12) for c in by_variant["small"])
    assert all(c.loss == cfg.loss and c.data.image_size == cfg.data.image_size for c in by_variant["current"])
    child = by_variant["relw"][0]
    assert grid_point(child) == "variant=relw"
    assert run_name(child) == "fsg_gr-frac1-val1-seed3-variant=relw"
    assert len({run_name(c) for c in children}) == len(children)  # a child's name is its resume key


def test_validation_folds_keep_the_test_fold_and_training_seeds_keep_the_data(configs):
    configs("search", SEARCH)
    children = list(child_configs(load_config("search")))
    assert {c.data.test_fold for c in children} == {0}
    assert sorted({c.data.val_fold for c in children}) == [1, 2]
    assert sorted({c.seed for c in children}) == [3, 4]
    # the base seed (0) generates the data and draws the folds for every training seed
    assert {(c.data.synthetic_seed, c.data.split_seed) for c in children} == {(0, 0)}
    plain = list(child_configs(load_config("search", ["sweep.fold_role=test", "sweep.seed_role=all"])))
    assert {(c.data.test_fold, c.data.val_fold) for c in plain} == {(1, 2), (2, 3)}
    assert {(c.data.synthetic_seed, c.data.split_seed) for c in plain} == {(None, None)}
    assert run_name(plain[0]) == "fsg_gr-frac1-fold1-seed3-variant=current"
    # smoke keeps test fold 0 out: its validation fold is 1
    assert load_config("search", smoke=True).sweep.folds == [1]


def test_a_chosen_variant_applies_to_a_single_run_and_survives_a_round_trip(configs, tmp_path):
    configs("search", SEARCH)
    cfg = load_config("search", ["sweep.enabled=false", "sweep.variant=small", "data.context=1.0"])
    assert (cfg.data.image_size, cfg.model.patch_size, cfg.data.context) == (96, 12, 1.0)
    assert run_name(cfg) == "fsg_gr-frac1-val1-seed0-variant=small"
    assert load_config_file(dump_config(cfg, tmp_path / "config.yaml")) == cfg
    swept = list(child_configs(load_config("search", ["sweep.variant=relw"])))
    assert {c.sweep.variant for c in swept} == {"relw"} and len(swept) == 2 * 2 * 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sweep.variants={bad: {optim.epoch: 3}}", "'optim.epoch'"),
        ("sweep.variants={bad: {optim.epochs: 0}}", "sweep.variants['bad']['optim.epochs']"),
        ("sweep.variants={bad: {seed: 1}}", "already an axis of the sweep"),
        ("sweep.variants={bad: {fsg.enabled: true}}", "derives from 'regularizer'"),
        ("sweep.variants={bad: {data.shift: 2}}", "read by task image_class only"),
        ("sweep.variants={'a,b': {}}", "a variant's name is letters"),
        ("sweep.grid={loss.main_weights: [[1.0, 1.0, 1.0]]}", "'loss.main_weights' is a sweep.grid axis already"),
        ("sweep.variant=nope", "'sweep.variant' = nope is not a key of 'sweep.variants'"),
        ("sweep.folds=[0, 1]", "keeps out of training and of the choice"),
    ],
)
def test_variant_and_fold_role_errors_name_the_key(configs, override, expected):
    configs("search", SEARCH)
    assert expected in _error("search", [override])


def test_the_shipped_search_starts_from_the_main_jobs_recipe():
    text = yaml.safe_load((CONFIG_DIR / "recipe_search.yaml").read_text(encoding="utf-8"))
    search, main = load_config("recipe_search"), load_config("polyp_size_fsg")
    assert text["sweep"]["variants"]["current"] == {}
    current = [c for c in child_configs(search) if c.sweep.variant == "current" and c.regularizer == "fsg_gr"]
    for child in current:
        assert (child.model, child.optim, child.loss, child.gr) == (main.model, main.optim, main.loss, main.gr)
        assert child.data.model_dump(exclude={"val_fold", "synthetic_seed", "split_seed"}) == main.data.model_dump(
            exclude={"val_fold", "synthetic_seed", "split_seed"}
        )
    assert sorted({c.data.val_fold for c in current}) == [1, 2, 3, 4] and {c.seed for c in current} == {0, 1}
    assert {c.regularizer for c in child_configs(search)} == {"fsg_gr", "baseline_appearance"}
    tests = load_config("recipe_search", ["sweep.variant=relw"], profile="test_folds")
    read = list(child_configs(tests))
    assert [(c.data.test_fold, c.data.val_fold) for c in read if c.regularizer == "fsg_gr"] == [
        (k, (k + 1) % 5) for k in range(5)
    ]
    assert all(c.loss.main_weights == [1.0, 0.4, 0.2] for c in read)


def test_a_split_seed_fixes_the_folds_and_split_whatever_the_seed(configs, data_cache, monkeypatch):
    monkeypatch.setenv("FSG_ENDO_CACHE", str(data_cache))
    configs("exp", "data: {synthetic_seed: 0, train_fraction: 0.5}\n")
    base = prepare_splits(load_config("exp", smoke=True))
    pinned = prepare_splits(load_config("exp", ["seed=1", "data.split_seed=0"], smoke=True))
    assert pinned.manifest == base.manifest
    for name in ("train", "val", "test"):
        assert pinned.splits[name]["frame_path"].tolist() == base.splits[name]["frame_path"].tolist()
    assert prepare_splits(load_config("exp", ["seed=1"], smoke=True)).manifest != base.manifest


def test_validation_metrics_are_read_at_the_best_epoch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    trained, baseline = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    for epoch, (step, value) in enumerate([(10, 3.0), (20, 2.0), (30, 2.5)], start=1):
        client.log_metric(trained, "epoch", epoch, step=step)
        client.log_metric(trained, "lesion/val/mae", value, step=step)
    client.log_metric(trained, "best_epoch", 2, step=30)
    client.log_metric(baseline, "lesion/val/mae", 1.5, step=0)
    runs = pd.DataFrame(
        {"run_id": [trained, baseline], "lesion/val/mae": [2.5, 1.5], "best_epoch": [2.0, np.nan]}, index=[7, 9]
    )
    assert at_best_epoch(client, runs, "lesion/val/mae").to_dict() == {7: 2.0, 9: 1.5}


def test_a_run_of_a_validation_sweep_is_filed_under_its_validation_fold(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    for role, val in (("validation", 3), ("test", 2)):
        run = client.create_run(exp, tags={"regularizer": "fsg_gr", "mlflow.runName": role}).info.run_id
        for key, value in {"sweep.fold_role": role, "data.test_fold": 1, "data.val_fold": val}.items():
            client.log_param(run, key, value)
    runs = search_runs(client, "e").set_index("run_name")
    assert (runs.loc["validation", "fold"], runs.loc["test", "fold"]) == (3, 1)


def test_a_smoke_search_runs_and_its_report_pairs_variants_per_cell(tmp_path, data_cache, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the report reads it first
    args = ["--exp", "recipe_search", "--smoke", "--set", "sweep.executor=sequential"]
    args += ["--set", "sweep.train_fractions=[1.0]", "--set", "sweep.seeds=[0, 1]"]
    assert in_process(args, tmp_path, data_cache, uri) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("recipe_search").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("regularizer") == "sweep"]
    children = [r for r in runs if r.data.tags.get("regularizer") != "sweep"]
    assert len(children) == 2 * 4 * 2 and all(r.info.status == "FINISHED" for r in children)
    # test fold 0 held out everywhere; one dataset and one set of folds for both training seeds
    params = pd.DataFrame([r.data.params for r in children])
    assert set(params["data.test_fold"]) == {"0"} and set(params["data.val_fold"]) == {"1"}
    assert set(params["data.synthetic_seed"]) == {"0"} and set(params["data.split_seed"]) == {"0"}
    assert set(params["seed"]) == {"0", "1"}
    assert len({r.data.tags["data.manifest_sha256"] for r in children}) == 1
    # the best checkpoint's validation MAE per child, as the sweep's summary holds it, paired by hand
    summary = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep/summary.csv", str(tmp_path)))
    summary["variant"] = summary["grid_point"].str.removeprefix("variant=")
    value = summary.set_index(["regularizer", "variant", "fold", "seed"])["lesion/val/mae"]
    report = report_table("recipe_search", uri, "lesion/val/mae", "current", axis="variant").set_index("arm")
    for variant in ("relw", "logbox_unweighted", "chosen_geometric"):
        row = report.loc[f"fsg_gr @ variant={variant}"]
        ours = [value["fsg_gr", variant, 1, s] for s in (0, 1)]
        diff = [value["fsg_gr", variant, 1, s] - value["fsg_gr", "current", 1, s] for s in (0, 1)]
        assert row["reference"] == "fsg_gr @ variant=current" and row["n"] == 2
        assert row["mean"] == pytest.approx(np.mean(ours)) and row["diff_mean"] == pytest.approx(np.mean(diff))
        assert row["effect_size"] == pytest.approx(np.mean(diff) / np.std(diff, ddof=1))  # pairs seed with seed
    assert report.loc["baseline_appearance @ variant=relw", "diff_mean"] == pytest.approx(0.0)
    against = report_table("recipe_search", uri, reference="baseline_appearance").set_index("grid_point")
    gap = [value["fsg_gr", "relw", 1, s] - value["baseline_appearance", "relw", 1, s] for s in (0, 1)]
    assert against.loc["variant=relw", "diff_mean"] == pytest.approx(np.mean(gap))  # default metric: lesion/val/mae

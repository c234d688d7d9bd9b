"""Config loading: merge order, every error kind (one line naming file and key), derived keys, flatten."""

import copy
import textwrap

import pytest

from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import (
    dump_config,
    flatten_config,
    load_config,
    load_config_file,
    revalidate,
    set_in,
)
from fsg_endo.experiment.runs import run_params
from fsg_endo.experiment.schema import DEFAULTS, SMOKE


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A config folder of temporary YAMLs; returns a writer ``(name, text) -> path``."""
    monkeypatch.setenv("FSG_ENDO_CONFIG_DIR", str(tmp_path))

    def write(name: str, text: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def _error(exp, **kwargs) -> str:
    with pytest.raises(FsgEndoError) as info:
        load_config(exp, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


EXP = """\
    task: size_class3
    optim:
      epochs: 3
    profiles:
      fast:
        optim: {epochs: 4, batch_size: 16}
      paper:
        optim: {batch_size: 64}
"""


def test_merge_order_defaults_yaml_profile_smoke_overrides(configs):
    configs("exp", EXP)
    cfg = load_config("exp")
    assert cfg["name"] == "exp" and cfg["task"] == "size_class3" and cfg["optim"]["epochs"] == 3
    assert cfg["optim"]["batch_size"] == DEFAULTS["optim"]["batch_size"]
    assert cfg["optim"]["lr"] == DEFAULTS["optim"]["lr"] and cfg["data"] == DEFAULTS["data"]
    cfg = load_config("exp", profile="fast")
    assert (cfg["optim"]["epochs"], cfg["optim"]["batch_size"]) == (4, 16)
    cfg = load_config("exp", profile="fast", smoke=True)
    assert (cfg["optim"]["epochs"], cfg["optim"]["batch_size"]) == (SMOKE["optim.epochs"], SMOKE["optim.batch_size"])
    assert cfg["data"]["image_size"] == SMOKE["data.image_size"] and cfg["task"] == "size_class3"
    cfg = load_config("exp", ["optim.epochs=7", "optim.epochs=8"], profile="fast", smoke=True)
    assert cfg["optim"]["epochs"] == 8
    assert "profiles" not in cfg


def test_yaml_profile_extends_the_builtin_paper_profile(configs):
    configs("exp", EXP)
    cfg = load_config("exp", profile="paper")
    assert cfg["optim"]["batch_size"] == 64  # from the YAML's paper profile
    assert cfg["model"]["preset"] == "ti" and cfg["data"]["image_size"] == 384  # built-in paper profile
    assert cfg["optim"]["lr"] == pytest.approx(5e-5) and cfg["gr"]["gate_lr"] == pytest.approx(1e-4)
    configs("plain", "task: size_regression\n")
    assert load_config("plain", profile="paper")["optim"]["epochs"] == 40


def test_the_paper_profile_keeps_the_papers_model_over_the_cpu_recipe():
    cpu, paper = load_config("polyp_size_fsg"), load_config("polyp_size_fsg", profile="paper")
    assert (cpu["model"]["size_head"], cpu["model"]["patch_size"], cpu["optim"]["epochs"]) == ("log_box", 16, 26)
    assert (paper["model"]["size_head"], paper["model"]["preset"], paper["model"]["patch_size"]) == ("linear", "ti", 16)
    assert paper["optim"]["epochs"] == 40 and paper["data"]["image_size"] == 384


def test_name_from_yaml_wins_over_the_file_name_and_paths_load(configs, tmp_path):
    path = configs("other", "name: my_experiment\n")
    assert load_config("other")["name"] == "my_experiment"
    assert load_config(str(path))["name"] == "my_experiment"


def test_exponent_floats_and_int_for_float(configs):
    configs("exp", "optim:\n  lr: 1e-4\n  clip: 5\nloss:\n  main_weights: [1, 2, 3e0]\n")
    cfg = load_config("exp", ["gr.gate_lr=2e-4"])
    assert cfg["optim"]["lr"] == 1e-4 and type(cfg["optim"]["lr"]) is float
    assert cfg["optim"]["clip"] == 5.0 and type(cfg["optim"]["clip"]) is float
    assert cfg["gr"]["gate_lr"] == 2e-4
    assert cfg["loss"]["main_weights"] == [1.0, 2.0, 3.0]


def test_set_values_read_as_yaml(configs):
    configs("exp", "{}\n")
    cfg = load_config(
        "exp",
        ["data.root=2024", "model.depth=3", "data.videos=null", "sweep.folds=[0, 2]", "data.fov_mask=false", "name=x"],
    )
    assert cfg["data"]["root"] == "2024" and cfg["model"]["depth"] == 3 and cfg["data"]["videos"] is None
    assert cfg["sweep"]["folds"] == [0, 2] and cfg["data"]["fov_mask"] is False and cfg["name"] == "x"


@pytest.mark.parametrize(
    "regularizer, fsg, gr, accumulate",
    [
        ("none", False, False, False),
        ("dropout", False, False, False),
        ("fsg", True, False, False),
        ("fsg_gr", True, True, False),
        ("fsg_frozen", True, False, False),
        ("fsg_gr_release", True, True, True),
    ],
)
def test_derived_facts_are_params_not_keys(configs, regularizer, fsg, gr, accumulate):
    configs("exp", f"regularizer: {regularizer}\n")
    cfg = load_config("exp")
    assert "fsg" not in cfg and "enabled" not in cfg["gr"]
    params = run_params(cfg)
    facts = (params["fsg.enabled"], params["gr.enabled"], params["gr.accumulate_gate_pass_grads"])
    assert facts == (fsg, gr, accumulate)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("optim:\n  lrr: 0.1\n", ["exp.yaml", "'optim.lrr'", "did you mean 'optim.lr'"]),
        ("lr: 0.1\n", ["exp.yaml", "'lr'", "did you mean 'optim.lr'"]),
        ("datta:\n  folds: 3\n", ["exp.yaml", "'datta'", "did you mean 'data'"]),
        (
            "profiles:\n  paper:\n    model:\n      depht: 2\n",
            ["exp.yaml", "profile 'paper'", "'model.depht'", "'model.depth'"],
        ),
        ("optim:\n  epochs: 2.5\n", ["exp.yaml", "'optim.epochs'", "int", "float"]),
        ("optim:\n  epochs: true\n", ["'optim.epochs'", "int", "bool"]),
        ("optim:\n  lr: null\n", ["'optim.lr'", "float", "NoneType"]),
        ("data:\n  root: 3\n", ["'data.root'", "str or null", "int"]),
        ("sweep:\n  folds: [0, a]\n", ["'sweep.folds'", "list[int]"]),
        ("loss:\n  main_weights: 3\n", ["'loss.main_weights'", "list[float]"]),
        ("task: size\n", ["exp.yaml", "'task'", "size_regression, size_class3, size_class2"]),
        ("regularizer: l2\n", ["'regularizer'", "none, dropout, fsg, fsg_gr"]),
        ("data:\n  cache: ram\n", ["'data.cache'", "none, memory, disk"]),
        ("data:\n  source: kvasir\n", ["'data.source'", "synthetic, realcolon, sun"]),
        ("model:\n  preset: l\n", ["'model.preset'", "micro, ti, s, b"]),
        ("device: gpu\n", ["'device'", "auto, cpu, cuda"]),
        ("data:\n  train_fraction: 1.5\n", ["'data.train_fraction'", "(0, 1]"]),
        ("fsg:\n  enabled: true\n", ["exp.yaml", "'fsg.enabled'", "derives from 'regularizer'"]),
        ("gr:\n  enabled: false\n", ["'gr.enabled'", "derives from 'regularizer'"]),
        ("data: 5\n", ["exp.yaml", "'data'", "mapping"]),
        ("data:\n  test_fold: 1\n", ["exp.yaml", "'data.test_fold'", "'data.val_fold'"]),
        ("data:\n  image_size: 60\n", ["'data.image_size'", "'model.patch_size'"]),
        ("- a\n- b\n", ["exp.yaml", "mapping"]),
    ],
)
def test_yaml_errors_name_the_file_and_key(configs, yaml_text, expected):
    configs("exp", yaml_text)
    message = _error("exp")
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", ["--set optim.lrr=1", "'optim.lrr'", "did you mean 'optim.lr'"]),
        ("data.imagesize=32", ["--set", "'data.imagesize'", "'data.image_size'"]),
        ("optim.lr=fast", ["--set", "'optim.lr'", "float", "str"]),
        ("optim.epochs", ["--set", "KEY=VALUE"]),
        ("=3", ["--set", "KEY=VALUE"]),
        ("task=size", ["--set task=size", "size_regression"]),
        ("fsg.enabled=true", ["--set", "'fsg.enabled'", "derives from 'regularizer'"]),
        ("sweep.regularizers=[none, l1]", ["'sweep.regularizers'", "fsg_gr", "'l1'"]),
        ("sweep.grid={gr.gate_lrr: [0.1]}", ["sweep.grid", "'gr.gate_lrr'", "did you mean 'gr.gate_lr'"]),
        ("sweep.grid={gr.gate_lr: [0.1, -1]}", ["sweep.grid['gr.gate_lr']", "> 0", "-1"]),
        ("sweep.grid={gr.gate_lr: [0.1, 0.1]}", ["sweep.grid['gr.gate_lr']", "twice"]),
        ("sweep.grid={optim.epochs: 3}", ["sweep.grid['optim.epochs']", "non-empty list"]),
        ("sweep.grid={optim.epochs: [2, two]}", ["sweep.grid['optim.epochs']", "int", "'two'"]),
        ("sweep.grid={seed: [0, 1]}", ["sweep.grid['seed']", "already an axis"]),
        ("sweep.grid={fsg.enabled: [true]}", ["sweep.grid['fsg.enabled']", "derives from 'regularizer'"]),
        ("sweep.grid=[gr.gate_lr]", ["'sweep.grid'", "dict"]),
        ("model.size_head=log", ["'model.size_head'", "one of linear, log_box", "'log'"]),
    ],
)
def test_set_errors_name_set_and_key(configs, override, expected):
    configs("exp", "{}\n")
    message = _error("exp", overrides=[override])
    for part in expected:
        assert part in message


def test_unknown_profile_lists_available(configs):
    configs("exp", EXP)
    message = _error("exp", profile="fats")
    assert "exp.yaml" in message and "'fats'" in message
    assert "fast" in message and "paper" in message


def test_unknown_experiment_lists_available(configs):
    configs("exp_one", "{}\n")
    message = _error("exp_on")
    assert "exp_on" in message and "did you mean 'exp_one'" in message
    assert "missing/config.yaml" in _error("missing/config.yaml")


@pytest.mark.parametrize(
    "text, line",
    [
        ("task: size_regression\noptim:\n  lr: [1, 2\n", None),
        ("task: size_regression\ndata:\n  folds: 3\n   val_fold: 2\n", 4),
        ("task: size_class3\ntask: size_class2\n", 2),
    ],
)
def test_malformed_yaml_is_one_line_with_file_and_line(configs, text, line):
    configs("broken", text)
    message = _error("broken")
    assert "broken.yaml:" in message and ("malformed YAML" in message)
    if line is not None:
        assert f"broken.yaml:{line}:" in message


def test_smoke_values_and_untouched_keys(configs):
    configs("exp", "{}\n")
    cfg = load_config("exp", smoke=True)
    for key, value in SMOKE.items():
        section, leaf = key.split(".")
        assert cfg[section][leaf] == value
    assert cfg["optim"]["lr"] == DEFAULTS["optim"]["lr"]


def test_flatten_config(configs):
    configs("exp", "sweep:\n  seeds: [0, 1]\n")
    flat = flatten_config(load_config("exp"))
    assert flat["model.depth"] == "null" and flat["data.train_fraction"] == 1.0
    assert "fsg.enabled" not in flat and "gr.enabled" not in flat
    assert flat["task"] == "size_regression" and flat["seed"] == 0
    assert flat["sweep.seeds"] == "[0, 1]" and flat["optim.lr"] == 5e-4
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert all("." in k for k in flat if k not in ("name", "task", "regularizer", "seed", "device"))


def test_dump_round_trip(configs, tmp_path):
    configs("exp", EXP)
    cfg = load_config("exp", ["data.root=some/where", "regularizer=fsg"], profile="paper", smoke=True)
    path = dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config_file(path) == cfg
    assert load_config(str(path)) == cfg  # the dumped file is a valid experiment config
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left


def test_revalidate_rechecks_every_key_and_across_keys(configs):
    configs("exp", "{}\n")
    cfg = load_config("exp")
    child = copy.deepcopy(cfg)
    child["regularizer"] = "fsg"
    child["data"]["train_fraction"] = 1
    out = revalidate(child)
    assert out["regularizer"] == "fsg" and type(out["data"]["train_fraction"]) is float
    child["data"]["test_fold"] = 1
    with pytest.raises(FsgEndoError, match="test_fold"):
        revalidate(child)
    child["data"]["test_fold"] = "0"
    with pytest.raises(FsgEndoError, match="'data.test_fold' must be int"):
        revalidate(child)


def test_set_in_returns_a_validated_copy(configs):
    configs("exp", "{}\n")
    cfg = load_config("exp")
    before = copy.deepcopy(cfg)
    child = set_in(cfg, "regularizer", "none")
    assert cfg == before
    assert child["regularizer"] == "none" and run_params(child)["fsg.enabled"] is False
    assert set_in(cfg, "data.train_fraction", "0.25")["data"]["train_fraction"] == 0.25
    with pytest.raises(FsgEndoError, match="'data.train_fraction'"):
        set_in(cfg, "data.train_fraction", 2.0)
    with pytest.raises(FsgEndoError, match="did you mean 'optim.lr'"):
        set_in(cfg, "optim.lrr", 1.0)


def test_real_config_errors_stop_the_cli_with_one_line(configs, capsys):
    from fsg_endo.cli import main

    path = configs("exp", "optim:\n  lrr: 0.1\n")
    assert main(["run", "--exp", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exp.yaml" in err and "'optim.lrr'" in err


@pytest.mark.parametrize("yaml_text", ["model:\n  box_features: false\n", "task: size_class3\n"])
def test_log_box_head_needs_size_regression_with_the_box(configs, yaml_text):
    configs("exp", yaml_text)
    assert load_config("exp")["model"]["size_head"] == "linear"
    message = _error("exp", overrides=["model.size_head=log_box"])
    assert "'model.size_head' = log_box needs task size_regression and 'model.box_features' = true" in message


@pytest.mark.parametrize(
    "override, rule",
    [
        ("data.videos=0", ">= 1"),
        ("sweep.train_fractions=[2]", "in (0, 1]"),
        ("sweep.seeds=[-1]", ">= 0"),
        ("model.dropout=1", "in [0, 1)"),
        ("optim.lr=0", "> 0"),
        ("loss.main_weights=[1, 2]", "3 values"),
        ("sweep.folds=[]", "at least one value"),
    ],
)
def test_constraints_are_stated_in_the_error(configs, override, rule):
    configs("exp", "{}\n")
    message = _error("exp", overrides=[override])
    assert f"'{override.split('=')[0]}'" in message and rule in message


def test_sweep_grid_expands_into_children_named_by_their_values(configs):
    from fsg_endo.experiment.runs import run_name
    from fsg_endo.experiment.sweep import child_configs

    configs("exp", "sweep:\n  regularizers: [none, fsg_gr]\n  train_fractions: [0.5]\n  folds: [0, 1]\n")
    cfg = load_config("exp", ["sweep.grid={gr.gate_lr: [1e-3, 1e-1], model.depth: [2, 3]}"])
    assert cfg["sweep"]["grid"] == {"gr.gate_lr": [0.001, 0.1], "model.depth": [2, 3]}
    children = list(child_configs(cfg))
    assert len(children) == 2 * 4 * 2  # regularizers x grid points x folds
    points = {(c["regularizer"], c["gr"]["gate_lr"], c["model"]["depth"], c["data"]["test_fold"]) for c in children}
    assert len(points) == len(children)
    names = [run_name(c) for c in children]
    assert len(set(names)) == len(names)  # a child's name is its resume key
    child = next(c for c in children if c["gr"]["gate_lr"] == 0.1 and c["model"]["depth"] == 3)
    assert run_name(child).endswith("-gr.gate_lr=0.1,model.depth=3")
    assert flatten_config(child)["gr.gate_lr"] == 0.1 and flatten_config(child)["model.depth"] == 3
    assert run_name(load_config("exp")) == "fsg_gr-frac1-fold0-seed0"  # no grid, no suffix

"""Config loading: merge order, every error kind (one line naming file and key), derived keys, flatten."""

import copy
import textwrap

import pytest
import yaml

from fsg_endo.engine.schema import SMOKE, SMOKE_OF_TASK, Config
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import (
    CONFIG_DIR,
    dump_config,
    flatten_config,
    list_experiments,
    load_config,
    load_config_file,
    revalidate,
    set_in,
)
from fsg_endo.experiment.runs import run_params


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
    model:
      size_head: linear
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
    assert cfg.name == "exp" and cfg.task == "size_class3" and cfg.optim.epochs == 3
    assert cfg.optim.batch_size == Config().optim.batch_size
    assert cfg.optim.lr == Config().optim.lr and cfg.data == Config().data
    cfg = load_config("exp", profile="fast")
    assert (cfg.optim.epochs, cfg.optim.batch_size) == (4, 16)
    cfg = load_config("exp", profile="fast", smoke=True)
    assert (cfg.optim.epochs, cfg.optim.batch_size) == (SMOKE["optim.epochs"], SMOKE["optim.batch_size"])
    assert cfg.data.image_size == SMOKE["data.image_size"] and cfg.task == "size_class3"
    cfg = load_config("exp", ["optim.epochs=7", "optim.epochs=8"], profile="fast", smoke=True)
    assert cfg.optim.epochs == 8
    assert "profiles" not in cfg


def test_yaml_profile_extends_the_builtin_paper_profile(configs):
    configs("exp", EXP)
    cfg = load_config("exp", profile="paper")
    assert cfg.optim.batch_size == 64  # from the YAML's paper profile
    assert cfg.model.preset == "ti" and cfg.data.image_size == 384  # built-in paper profile
    assert cfg.optim.lr == pytest.approx(5e-5) and cfg.gr.gate_lr == pytest.approx(1e-4)
    configs("plain", "task: size_regression\n")
    assert load_config("plain", profile="paper").optim.epochs == 40


def test_the_paper_profile_keeps_the_papers_model_over_the_cpu_recipe():
    cpu, paper = load_config("polyp_size_fsg"), load_config("polyp_size_fsg", profile="paper")
    assert (cpu.model.size_head, cpu.model.patch_size, cpu.optim.epochs) == ("log_box", 16, 26)
    assert (paper.model.size_head, paper.model.preset, paper.model.patch_size) == ("linear", "ti", 16)
    assert paper.optim.epochs == 40 and paper.data.image_size == 384


def test_name_from_yaml_wins_over_the_file_name_and_paths_load(configs, tmp_path):
    path = configs("other", "name: my_experiment\n")
    assert load_config("other").name == "my_experiment"
    assert load_config(str(path)).name == "my_experiment"


def test_exponent_floats_and_int_for_float(configs):
    configs("exp", "optim:\n  lr: 1e-4\n  clip: 5\nloss:\n  main_weights: [1, 2, 3e0]\n")
    cfg = load_config("exp", ["gr.gate_lr=2e-4"])
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.clip == 5.0 and type(cfg.optim.clip) is float
    assert cfg.gr.gate_lr == 2e-4
    assert cfg.loss.main_weights == [1.0, 2.0, 3.0]


def test_set_values_read_as_yaml(configs):
    configs("exp", "{}\n")
    cfg = load_config(
        "exp",
        ["data.root=2024", "model.depth=3", "data.videos=null", "sweep.folds=[0, 2]", "data.fov_mask=false", "name=x"],
    )
    assert cfg.data.root == "2024" and cfg.model.depth == 3 and cfg.data.videos is None
    assert cfg.sweep.folds == [0, 2] and cfg.data.fov_mask is False and cfg.name == "x"


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
    assert "fsg" not in Config.model_fields and "enabled" not in type(cfg.gr).model_fields
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
        assert getattr(getattr(cfg, section), leaf) == value
    assert cfg.optim.lr == Config().optim.lr


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
    child = cfg.model_dump()  # a config edited as a nested dict
    child["regularizer"] = "fsg"
    child["data"]["train_fraction"] = 1
    out = revalidate(child)
    assert out.regularizer == "fsg" and type(out.data.train_fraction) is float
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
    assert child.regularizer == "none" and run_params(child)["fsg.enabled"] is False
    assert set_in(cfg, "data.train_fraction", "0.25").data.train_fraction == 0.25
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
    assert load_config("exp", overrides=["model.size_head=linear"]).model.size_head == "linear"
    message = _error("exp")  # the default head is log_box, the main job's
    assert "'model.size_head' = log_box needs task size_regression and 'model.box_features' = true" in message
    assert "set model.size_head: linear" in message


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
    assert cfg.sweep.grid == {"gr.gate_lr": [0.001, 0.1], "model.depth": [2, 3]}
    children = list(child_configs(cfg))
    assert len(children) == 2 * 4 * 2  # regularizers x grid points x folds
    points = {(c.regularizer, c.gr.gate_lr, c.model.depth, c.data.test_fold) for c in children}
    assert len(points) == len(children)
    names = [run_name(c) for c in children]
    assert len(set(names)) == len(names)  # a child's name is its resume key
    child = next(c for c in children if c.gr.gate_lr == 0.1 and c.model.depth == 3)
    assert run_name(child).endswith("-gr.gate_lr=0.1,model.depth=3")
    assert flatten_config(child)["gr.gate_lr"] == 0.1 and flatten_config(child)["model.depth"] == 3
    assert run_name(load_config("exp")) == "fsg_gr-frac1-fold0-seed0"  # no grid, no suffix


@pytest.mark.parametrize(
    "where, kwargs",
    [
        ("--set data.shift=2", {"overrides": ["data.shift=2"]}),
        ("--set data.train_limit=10", {"overrides": ["data.train_limit=10"]}),
        ("exp.yaml", {"overrides": []}),
        ("(sweep.grid)", {"overrides": ["sweep.grid={data.test_limit: [10, 20]}"]}),
    ],
)
def test_keys_of_image_class_are_refused_for_the_polyp_tasks(configs, where, kwargs):
    configs("exp", "data:\n  flip: false\n" if kwargs["overrides"] == [] else "{}\n")
    message = _error("exp", **kwargs)
    key = next(k for k in ("data.shift", "data.train_limit", "data.flip", "data.test_limit") if k in message)
    readers = "image_class" if key in ("data.shift", "data.flip") else "image_class or text_class"
    assert where in message and f"read by task {readers} only, not by task size_regression" in message
    assert f"'{key}'" in message


def test_smoke_sets_the_image_limits_for_image_class_only(configs):
    configs("polyp", "{}\n")
    configs(
        "images",
        "task: image_class\ndata: {source: mnist, shift: 2}\nmodel: {box_features: false, size_head: linear}\n",
    )
    polyp, images = load_config("polyp", smoke=True), load_config("images", smoke=True)
    assert (polyp.data.train_limit, polyp.data.test_limit) == (None, None)
    limits = SMOKE_OF_TASK["image_class"]
    assert (images.data.train_limit, images.data.test_limit) == (limits["data.train_limit"], limits["data.test_limit"])
    assert images.data.shift == 2 and images.data.image_size == SMOKE["data.image_size"]
    # the task an override sets decides the smoke values
    assert (
        load_config(
            "polyp",
            ["task=image_class", "data.source=mnist", "model.box_features=false", "model.size_head=linear"],
            smoke=True,
        ).data.train_limit
        == limits["data.train_limit"]
    )


def _stated(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("profiles", "grid", "variants"):
            yield from _stated(value, f"{prefix}{key}.")
        elif key != "profiles":
            yield f"{prefix}{key}", value


def _value(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("exp", list_experiments())
def test_a_shipped_config_states_only_what_differs_from_the_defaults_and_gets_it(exp):
    """The schema's defaults are the main job's recipe: each shipped YAML resolves to exactly the values it
    writes, and writes none that the defaults already hold."""
    text = yaml.safe_load((CONFIG_DIR / f"{exp}.yaml").read_text(encoding="utf-8")) or {}
    cfg, defaults = load_config(exp), Config()
    for key, value in _stated(text):
        assert _value(cfg, key) == value, key
        assert _value(defaults, key) != value, f"{exp}.yaml restates the default {key} = {value!r}"
    unstated = {k for k, _ in _stated(Config().model_dump())} - {k for k, _ in _stated(text)} - {"name"}
    assert all(_value(cfg, key) == _value(defaults, key) for key in unstated)


def test_the_main_job_is_the_defaults():
    assert load_config("polyp_size_fsg") == Config(name="polyp_size_fsg")
    cfg = Config()
    assert (cfg.task, cfg.regularizer, cfg.model.size_head, cfg.model.patch_size, cfg.optim.epochs) == (
        "size_regression",
        "fsg_gr",
        "log_box",
        16,
        26,
    )


@pytest.mark.parametrize(
    "task_yaml, good, bad",
    [
        (
            "{}\n",
            ["auto", "val/mae", "lesion/val/rmse", "val/cls3_f1_diminutive", "lesion/val/cls2_auroc"],
            ["val/mea", "mae"],
        ),
        ("task: size_class2\nmodel: {size_head: linear}\n", ["val/f1_ge10mm", "lesion/val/auroc"], ["val/mae"]),
        (
            "task: image_class\ndata: {source: mnist}\nmodel: {box_features: false, size_head: linear}\n",
            ["val/accuracy", "val/macro_f1", "val/f1_7"],
            ["lesion/val/accuracy", "test/accuracy", "val/acuracy"],
        ),
    ],
)
def test_eval_metric_is_checked_against_the_tasks_validation_metrics(configs, task_yaml, good, bad):
    from fsg_endo.engine.recipe import check_eval_metric

    configs("exp", task_yaml)
    for metric in good:
        check_eval_metric(load_config("exp", [f"eval.metric={metric}"]))
    for metric in bad:
        with pytest.raises(FsgEndoError) as info:
            check_eval_metric(load_config("exp", [f"eval.metric={metric}"]))
        assert f"eval.metric = '{metric}' is not a validation metric" in str(info.value)
        assert "\n" not in str(info.value)


def test_a_misspelt_eval_metric_stops_the_cli_before_a_run_opens(configs, tmp_path, monkeypatch, capsys):
    from fsg_endo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = configs("exp", "{}\n")
    assert main(["run", "--exp", str(path), "--set", "eval.metric=val/mea"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "eval.metric = 'val/mea'" in err and "val/mae" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()

"""Experiment configs: YAML loading, profiles, ``--set`` overrides, validation against the typed schema.

An experiment YAML (``fsg_endo/experiment/configs/NAME.yaml``, shipped with the package, or any path)
overrides only what differs from the defaults of :class:`~fsg_endo.engine.schema.Config`, may hold
named ``profiles:`` (partial configs, e.g. ``paper``) and a ``sweep:`` section. Every key, type and choice
is checked before any work starts; a mistake is one :class:`FsgEndoError` line naming the file (or
``--set``), the dotted key, the value and what is allowed. The resolved config is the typed, frozen
:class:`~fsg_endo.engine.schema.Config`; nested dicts exist only here, while layers are merged, and at the
edges (:func:`flatten_config` for MLflow params, :func:`dump_config` for the run folder).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fsg_endo.engine.schema import (
    DERIVED,
    PROFILES,
    REGULARIZERS,
    SMOKE,
    SMOKE_OF_FOLD_ROLE,
    SMOKE_OF_TASK,
    SWEEP_AXES,
    TASK_KEYS,
    Config,
)
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config_errors import FIELDS, LEAVES, describe, one_line, unknown_key
from fsg_endo.io import atomic_path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "FSG_ENDO_CONFIG_DIR"
VARIANT_NAME = re.compile(r"[\w.-]+", re.ASCII)  # the grid label and MLflow param names take it as it is


class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-4`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _display(path: Path) -> str:
    """A path as shown in messages: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def config_dir() -> Path:
    """The folder of named experiment configs (``$FSG_ENDO_CONFIG_DIR`` or :data:`CONFIG_DIR`)."""
    return Path(os.environ.get(CONFIG_DIR_ENV) or CONFIG_DIR)


def list_experiments() -> list[str]:
    """Names of the experiment YAMLs in :func:`config_dir`."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _find_config(exp: str) -> Path:
    """The YAML file of an experiment name or path."""
    path = Path(exp)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or os.sep in exp or "/" in exp:
        raise FsgEndoError(f"{exp}: no such config file")
    path = config_dir() / f"{exp}.yaml"
    if not path.is_file():
        names = list_experiments()
        close = difflib.get_close_matches(exp, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FsgEndoError(
            f"{_display(path)}: unknown experiment '{exp}'{hint}; available: {', '.join(names) or 'none'}"
        )
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; malformed YAML is one line with the file and line."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise FsgEndoError(f"{_display(path)}{line}: malformed YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FsgEndoError(f"{_display(path)}: cannot read config: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FsgEndoError(f"{_display(path)}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``("a.b", v)`` as ``{"a": {"b": v}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _nest_all(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A dotted-key mapping as a nested partial config."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict, in order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_text(key: str) -> bool:
    return key in FIELDS and describe(FIELDS[key].annotation) in ("str", "str or null")


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` as (key, value), the value read as YAML (``1e-4`` is a float, ``null`` is None).

    For a string key, a value that reads as a number or bool stays its text.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FsgEndoError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.epochs=3")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, validation decides whether a string fits
    if _is_text(key) and value is not None and not isinstance(value, (str, list, dict)):
        value = raw.strip()  # e.g. --set data.root=2024 names a folder, not a number
    return key, value


def _merge(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """``partial`` written over ``base``: sections merge key by key, other values replace."""
    out = copy.deepcopy(dict(base))
    for key, value in partial.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


def _refuse_derived(partial: Any, where: str, prefix: str = "") -> None:
    """Setting ``fsg.enabled`` or ``gr.enabled`` is an error that says they follow from ``regularizer``."""
    for key, value in partial.items() if isinstance(partial, Mapping) else ():
        dotted = f"{prefix}{key}"
        if dotted in DERIVED:
            raise FsgEndoError(
                f"{where}: '{dotted}' cannot be set: it derives from 'regularizer' "
                f"({DERIVED[dotted]}); set regularizer to one of {', '.join(REGULARIZERS)}"
            )
        _refuse_derived(value, where, f"{dotted}.")


def _validated(tree: Mapping[str, Any], where: str, partial: bool = False) -> Config:
    """``tree`` checked against :class:`Config` (``partial``: without the checks across keys)."""
    try:
        return Config.model_validate(tree, context={"partial": partial})
    except ValidationError as err:
        raise one_line(err, where) from None


Layer = tuple[Any, str]  # a partial config and where it comes from (for messages)


def _apply(cfg: Mapping[str, Any], layers: Sequence[Layer]) -> dict[str, Any]:
    """``cfg`` with each layer written over it in order; each layer is checked as it is applied, so an
    error names the layer that caused it."""
    for partial, where in layers:
        if not isinstance(partial, Mapping):
            raise FsgEndoError(f"{where}: a config must be a mapping of keys, got {type(partial).__name__}")
        _refuse_derived(partial, where)
        cfg = _validated(_merge(cfg, partial), where, partial=True).model_dump()
        _check_grid(cfg["sweep"]["grid"], where)
        _check_variants(cfg["sweep"]["variants"], cfg["sweep"]["grid"], where)
    return cfg


def _check_axis_key(key: str, at: str, where: str) -> None:
    """A key a sweep may vary: a config key, not derived, not one of the sweep's own axes or settings."""
    if key in DERIVED:
        raise FsgEndoError(f"{at}: '{key}' derives from 'regularizer' and cannot be an axis")
    if key not in LEAVES:
        raise unknown_key(key, where)
    if key in SWEEP_AXES or key.startswith("sweep."):
        raise FsgEndoError(
            f"{at}: '{key}' is already an axis of the sweep (sweep.regularizers, "
            "train_fractions, folds, seeds) or part of it"
        )


def _check_variants(variants: Mapping[str, Mapping[str, Any]], grid: Mapping[str, Any], where: str) -> None:
    """``sweep.variants``: names that read in a run name, and overrides checked like ``--set`` on keys that
    are not axes of the sweep already (``sweep.grid`` included)."""
    for name, overrides in variants.items():
        at = f"{where}: sweep.variants['{name}']"
        if not VARIANT_NAME.fullmatch(name):
            raise FsgEndoError(f"{at}: a variant's name is letters, digits, '_', '.' and '-' only")
        for key, value in overrides.items():
            _check_axis_key(key, f"{at}['{key}']", f"{where} (sweep.variants['{name}'])")
            if key in grid:
                raise FsgEndoError(f"{at}: '{key}' is a sweep.grid axis already")
            _validated(_nest(key, value), f"{at}['{key}']", partial=True)


def _check_grid(grid: Mapping[str, Any], where: str) -> None:
    """``sweep.grid``: every key a config key the sweep does not vary already, every value a list of
    distinct values each valid for that key (checked like ``--set``)."""
    for key, values in grid.items():
        at = f"{where}: sweep.grid['{key}']"
        _check_axis_key(key, at, f"{where} (sweep.grid)")
        if not isinstance(values, list) or not values:
            raise FsgEndoError(f"{at} must be a non-empty list of values, got {values!r}")
        for value in values:
            _validated(_nest(key, value), at, partial=True)
        if len({repr(v) for v in values}) < len(values):
            raise FsgEndoError(f"{at} lists a value twice: {values!r}")


def _resolve(layers: Sequence[Layer], where: str) -> Config:
    """The defaults with ``layers`` applied, then the overrides of ``sweep.variant`` if set (again on a config
    that holds them already: the same values), then checked across keys."""
    cfg = _apply(Config().model_dump(), layers)
    variant = cfg["sweep"]["variant"]
    if variant in cfg["sweep"]["variants"]:
        cfg = _apply(cfg, [(_nest_all(cfg["sweep"]["variants"][variant]), f"{where} (sweep.variants['{variant}'])")])
    return _validated(cfg, where)


def _refuse_other_tasks(cfg: Config, layers: Sequence[Layer], where: str) -> None:
    """A key that only other tasks read (:data:`TASK_KEYS`), set away from its default by a layer or made a
    sweep axis, is an error (a resolved config, which states every key at its default, still loads)."""
    defaults = dict(_leaves(Config().model_dump()))
    keys = [(key, at) for partial, at in layers for key, value in _leaves(partial) if value != defaults.get(key)]
    keys += [(key, f"{where} (sweep.grid)") for key in cfg.sweep.grid]
    keys += [(key, f"{where} (sweep.variants['{name}'])") for name, sets in cfg.sweep.variants.items() for key in sets]
    for key, where in keys:
        if cfg.task not in TASK_KEYS.get(key, (cfg.task,)):
            raise FsgEndoError(
                f"{where}: '{key}' is read by task {' or '.join(TASK_KEYS[key])} only, not by task {cfg.task}"
            )


def _profiles(profiles: Any, where: str) -> dict[str, list[Layer]]:
    """Each profile's layers: the built-in one of that name, then the YAML's (checked even when unused)."""
    if not isinstance(profiles, dict):
        raise FsgEndoError(f"{where}: 'profiles' must map profile names to partial configs")
    layers = {name: [(part, f"built-in profile '{name}'")] for name, part in PROFILES.items()}
    for name, part in profiles.items():
        layer = (part, f"{where} (profile '{name}')")
        _apply(Config().model_dump(), [layer])
        layers.setdefault(str(name), []).append(layer)
    return layers


def load_config(exp: str, overrides: Sequence[str] = (), profile: str | None = None, smoke: bool = False) -> Config:
    """The resolved config of an experiment (a name in :func:`config_dir` or a YAML path).

    Merge order: defaults <- YAML <- profile (built-in, then the YAML's) <- SMOKE (if ``smoke``: :data:`SMOKE`
    with the task's :data:`SMOKE_OF_TASK` and the fold role's :data:`SMOKE_OF_FOLD_ROLE`) <- ``overrides``
    (``key=value``) <- the overrides of ``sweep.variant`` if set. ``name`` defaults to the file's stem.
    """
    path = _find_config(exp)
    where = _display(path)
    data = _read_yaml(path)
    profiles = _profiles(data.pop("profiles", None) or {}, where)
    layers: list[Layer] = [({"name": path.stem}, where), (data, where)]
    if profile is not None:
        if profile not in profiles:
            raise FsgEndoError(f"{where}: unknown profile '{profile}'; available: {', '.join(profiles)}")
        layers.extend(profiles[profile])
    sets = [(_nest(*parse_override(text)), f"--set {text}") for text in overrides]
    if smoke:
        base = _apply(Config().model_dump(), layers + sets)
        extra = SMOKE_OF_TASK.get(base["task"], {}) | SMOKE_OF_FOLD_ROLE.get(base["sweep"]["fold_role"], {})
        layers.append((_nest_all(SMOKE | extra), "SMOKE"))
    layers += sets
    cfg = _resolve(layers, f"{where} with --set overrides" if overrides else where)
    _refuse_other_tasks(cfg, layers, where)
    return cfg


def load_config_file(path: str | os.PathLike) -> Config:
    """A resolved config written by :func:`dump_config` (e.g. to resume a run), validated again."""
    path = Path(path)
    if not path.is_file():
        raise FsgEndoError(f"{path}: no such config file")
    data = _read_yaml(path)
    data.pop("profiles", None)
    return _resolve([(data, _display(path))], _display(path))


def revalidate(cfg: Config | Mapping[str, Any], where: str = "config") -> Config:
    """A config checked again, every key and across keys; also the way in for a config built or edited as a
    nested dict (a test's, an edited ``config.yaml``): ``revalidate({"optim": {"epochs": 3}})``."""
    return _resolve([(_tree(cfg), where)], where)


def _tree(cfg: Config | Mapping[str, Any]) -> dict[str, Any]:
    return cfg.model_dump() if isinstance(cfg, Config) else dict(cfg)


def set_in(cfg: Config, dotted_key: str, value: Any) -> Config:
    """A copy of a config with one key changed (validated like ``--set``); ``cfg`` is untouched.

    A string value for a non-string key is read as YAML. Run :func:`revalidate` after changing keys that
    depend on each other.
    """
    if isinstance(value, str) and not _is_text(dotted_key):
        value = parse_override(f"{dotted_key}={value}")[1]
    where = f"set_in {dotted_key}"
    return _validated(_apply(_tree(cfg), [(_nest(dotted_key, value), where)]), where, partial=True)


def flatten_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """Dotted keys to scalars (MLflow params): lists become their ``str``, None becomes ``"null"``."""
    flat = {}
    for key, value in _leaves(cfg.model_dump()):
        if isinstance(value, list):
            value = str(value)
        flat[key] = "null" if value is None else value
    return flat


def dump_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write a resolved config as YAML, atomically; :func:`load_config` reads it back to the same config."""
    path = Path(path)
    with atomic_path(path) as tmp:
        text = yaml.safe_dump(cfg.model_dump(), sort_keys=False, default_flow_style=False)
        tmp.write_text(f"# resolved fsg_endo config\n{text}", encoding="utf-8")
    return path

"""Experiment configs: the schema (:data:`DEFAULTS`), YAML loading, overrides and validation.

An experiment YAML (``fsg_endo/experiment/configs/NAME.yaml``) overrides only what differs from
:data:`DEFAULTS`, may hold named ``profiles:`` (partial configs, e.g. ``paper``) and a ``sweep:``
section. Every key, type and choice is checked before any work starts; a mistake is one
:class:`FsgEndoError` line naming the file (or ``--set``) and the dotted key.
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

from fsg_endo.experiment.schema import (
    CHOICES,
    DEFAULTS,
    DERIVED,
    LIST_LENGTHS,
    NULLABLE,
    PROFILES,
    RANGES,
    REGULARIZERS,
    SMOKE,
)
from fsg_endo.errors import FsgEndoError
from fsg_endo.io import atomic_path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "FSG_ENDO_CONFIG_DIR"

def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict, in order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


_LEAF_DEFAULTS = dict(_leaves(DEFAULTS))
_SECTIONS = {key for key, value in DEFAULTS.items() if isinstance(value, dict)}
_DERIVED_SECTIONS = {"fsg"}  # sections made only of derived keys


class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-4`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _expected_type(key: str) -> type:
    """The Python type of a leaf key (of its elements for lists)."""
    default = _LEAF_DEFAULTS[key]
    if key in NULLABLE:
        return NULLABLE[key]
    return type(default[0]) if isinstance(default, list) else type(default)


def _coerce(value: Any, expected: type, is_list: bool) -> Any:
    """``value`` as ``expected`` (or a list of it); ints pass as floats; anything else raises TypeError."""
    if is_list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, expected, False) for v in value]
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:  # also keeps bools out of int keys
        raise TypeError
    return value


def _check_leaf(key: str, value: Any, where: str) -> Any:
    """Validate (and coerce) one leaf value; errors name ``where`` and the key."""
    if value is None and key in NULLABLE:
        return None
    expected, is_list = _expected_type(key), isinstance(_LEAF_DEFAULTS[key], list)
    try:
        value = _coerce(value, expected, is_list)
    except TypeError:
        want = f"list[{expected.__name__}]" if is_list else expected.__name__
        want += " or null" if key in NULLABLE else ""
        raise FsgEndoError(f"{where}: config key '{key}' must be {want}, "
                           f"got {type(value).__name__} {value!r}") from None
    items = value if is_list else [value]
    if is_list and not items:
        raise FsgEndoError(f"{where}: config key '{key}' must not be an empty list")
    if key in LIST_LENGTHS and len(items) != LIST_LENGTHS[key]:
        raise FsgEndoError(f"{where}: config key '{key}' must have {LIST_LENGTHS[key]} values, got {len(items)}")
    for item in items:
        if key in CHOICES and item not in CHOICES[key]:
            raise FsgEndoError(f"{where}: config key '{key}' must be one of {', '.join(CHOICES[key])}; got {item!r}")
        if key in RANGES and not RANGES[key][0](item):
            raise FsgEndoError(f"{where}: config key '{key}' must be {RANGES[key][1]}, got {item!r}")
    return value


def _unknown_key(key: str, where: str) -> FsgEndoError:
    """The error for an unknown dotted key, with the closest known key as a suggestion."""
    known = list(_LEAF_DEFAULTS) + sorted(_SECTIONS)
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not match:  # a misplaced or misspelt leaf name, e.g. 'lr' or 'optim.learning_rat'
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _LEAF_DEFAULTS}
        match = [by_leaf[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf, n=1, cutoff=0.7)]
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return FsgEndoError(f"{where}: unknown config key '{key}'{hint}")


def _assignments(partial: Any, where: str, prefix: str = "", keep_derived: bool = False) -> list[tuple[str, Any]]:
    """Validated (dotted key, value) pairs of a partial config (``keep_derived``: skip derived keys)."""
    if partial is None:
        return []
    if not isinstance(partial, dict):
        section = prefix.rstrip(".") or "the config"
        raise FsgEndoError(f"{where}: '{section}' must be a mapping of keys, got {type(partial).__name__}")
    pairs = []
    for key, value in partial.items():
        dotted = f"{prefix}{key}"
        if dotted in DERIVED and not keep_derived:
            raise FsgEndoError(f"{where}: '{dotted}' cannot be set: it derives from 'regularizer' "
                               f"({DERIVED[dotted]}); set regularizer to one of {', '.join(REGULARIZERS)}")
        if dotted in _SECTIONS or dotted in _DERIVED_SECTIONS:
            pairs.extend(_assignments(value, where, f"{dotted}.", keep_derived))
        elif dotted in _LEAF_DEFAULTS:
            pairs.append((dotted, _check_leaf(dotted, value, where)))
        elif dotted not in DERIVED:
            raise _unknown_key(dotted, where)
    return pairs


def _apply(cfg: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Write validated assignments into a full config."""
    for key, value in pairs:
        section, _, leaf = key.rpartition(".")
        (cfg[section] if section else cfg)[leaf] = copy.deepcopy(value)
    return cfg


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
        raise FsgEndoError(f"{_display(path)}: unknown experiment '{exp}'{hint}; "
                           f"available: {', '.join(names) or 'none'}")
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
    is_text_key = key in _LEAF_DEFAULTS and _expected_type(key) is str
    if is_text_key and value is not None and not isinstance(value, (str, list, dict)):
        value = raw.strip()  # e.g. --set data.root=2024 names a folder, not a number
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``("a.b", v)`` as ``{"a": {"b": v}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _derive(cfg: dict[str, Any]) -> dict[str, Any]:
    """Add the keys that follow from ``regularizer``: ``fsg.enabled`` and ``gr.enabled``."""
    cfg["fsg"] = {"enabled": cfg["regularizer"] in ("fsg", "fsg_gr")}
    cfg["gr"]["enabled"] = cfg["regularizer"] == "fsg_gr"
    return cfg


def validate_config(cfg: Mapping[str, Any], where: str = "config") -> None:
    """Checks across keys (folds, patch grid, heads): run after changing several keys of a config."""
    data, model, optim = cfg["data"], cfg["model"], cfg["optim"]
    folds = data["folds"]
    for key in ("test_fold", "val_fold"):
        if not 0 <= data[key] < folds:
            raise FsgEndoError(f"{where}: 'data.{key}' = {data[key]} is not a fold of data.folds = {folds}")
    if data["test_fold"] == data["val_fold"]:
        raise FsgEndoError(f"{where}: 'data.test_fold' and 'data.val_fold' are both {data['val_fold']}")
    bad = [f for f in cfg["sweep"]["folds"] if f >= folds]
    if bad:
        raise FsgEndoError(f"{where}: 'sweep.folds' {bad} are not folds of data.folds = {folds}")
    if data["image_size"] % model["patch_size"]:
        raise FsgEndoError(f"{where}: 'data.image_size' = {data['image_size']} is not a multiple of "
                           f"'model.patch_size' = {model['patch_size']}")
    if model["hidden_dim"] is not None and model["heads"] is not None and model["hidden_dim"] % model["heads"]:
        raise FsgEndoError(f"{where}: 'model.hidden_dim' = {model['hidden_dim']} is not divisible by "
                           f"'model.heads' = {model['heads']}")
    if optim["warmup_epochs"] > optim["epochs"]:
        raise FsgEndoError(f"{where}: 'optim.warmup_epochs' = {optim['warmup_epochs']} exceeds "
                           f"'optim.epochs' = {optim['epochs']}")


def _resolve(layers: Sequence[list[tuple[str, Any]]], where: str) -> dict[str, Any]:
    """DEFAULTS with the validated layers applied in order, checked across keys, with derived keys."""
    cfg = copy.deepcopy(DEFAULTS)
    for layer in layers:
        _apply(cfg, layer)
    validate_config(cfg, where)
    return _derive(cfg)


def _profile_layers(profiles: Any, where: str) -> dict[str, list[list[tuple[str, Any]]]]:
    """Each profile's layers: the built-in one of that name, then the YAML's (validated, even unused)."""
    if not isinstance(profiles, dict):
        raise FsgEndoError(f"{where}: 'profiles' must map profile names to partial configs")
    layers = {name: [_assignments(part, f"built-in profile '{name}'")] for name, part in PROFILES.items()}
    for name, part in profiles.items():
        layers.setdefault(str(name), []).append(_assignments(part, f"{where} (profile '{name}')"))
    return layers


def load_config(
    exp: str, overrides: Sequence[str] = (), profile: str | None = None, smoke: bool = False
) -> dict[str, Any]:
    """The resolved config of an experiment (a name in :func:`config_dir` or a YAML path).

    Merge order: DEFAULTS <- YAML <- profile (built-in, then the YAML's) <- SMOKE (if ``smoke``)
    <- ``overrides`` (``key=value``). ``name`` defaults to the file's stem; the result also has the
    derived ``fsg.enabled`` and ``gr.enabled``.
    """
    path = _find_config(exp)
    where = _display(path)
    data = _read_yaml(path)
    profiles = _profile_layers(data.pop("profiles", None) or {}, where)
    layers = [_assignments({"name": path.stem}, where), _assignments(data, where)]
    if profile is not None:
        if profile not in profiles:
            raise FsgEndoError(f"{where}: unknown profile '{profile}'; available: {', '.join(profiles)}")
        layers.extend(profiles[profile])
    if smoke:
        layers.append(_assignments(_nest_all(SMOKE), "SMOKE"))
    layers.extend(_assignments(_nest(*parse_override(text)), f"--set {text}") for text in overrides)
    return _resolve(layers, f"{where} with --set overrides" if overrides else where)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A resolved config written by :func:`dump_config` (e.g. to resume a run), validated again.

    Derived keys in the file are ignored and derived anew; profiles are not applied.
    """
    path = Path(path)
    if not path.is_file():
        raise FsgEndoError(f"{path}: no such config file")
    data = _read_yaml(path)
    data.pop("profiles", None)
    return _resolve([_assignments(data, _display(path), keep_derived=True)], _display(path))


def resolve_derived(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A new config from a (possibly edited) resolved config: every key checked again, derived keys recomputed."""
    return _resolve([_assignments(dict(cfg), "config", keep_derived=True)], "config")


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


def set_in(cfg: Mapping[str, Any], dotted_key: str, value: Any) -> dict[str, Any]:
    """A copy of a resolved config with one key changed (validated like ``--set``); ``cfg`` is untouched.

    A string value for a non-string key is read as YAML. Derived keys are updated; run
    :func:`validate_config` (or use :func:`resolve_derived`) after changing keys that depend on each other.
    """
    where = f"set_in {dotted_key}"
    if isinstance(value, str) and dotted_key in _LEAF_DEFAULTS and _expected_type(dotted_key) is not str:
        value = parse_override(f"{dotted_key}={value}")[1]
    return _derive(_apply(copy.deepcopy(dict(cfg)), _assignments(_nest(dotted_key, value), where)))


def flatten_config(cfg: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """Dotted keys to scalars (MLflow params): lists become their ``str``, None becomes ``"null"``."""
    flat = {}
    for key, value in _leaves(cfg):
        if isinstance(value, list):
            value = str(value)
        flat[key] = "null" if value is None else value
    return flat


def dump_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a resolved config as YAML, atomically; :func:`load_config` reads it back to the same config.

    The derived keys are left out (they follow from ``regularizer`` and cannot be set).
    """
    plain = copy.deepcopy(dict(cfg))
    plain.pop("fsg", None)
    plain.get("gr", {}).pop("enabled", None)
    path = Path(path)
    with atomic_path(path) as tmp:
        text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
        tmp.write_text(f"# resolved fsg_endo config; fsg.enabled and gr.enabled derive from regularizer\n{text}",
                       encoding="utf-8")
    return path

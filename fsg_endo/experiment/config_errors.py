"""Config errors as users read them: one line naming the key, the value and the rule, and the closest known
key for a misspelt one. Types and constraints are read from the schema (:class:`~fsg_endo.engine.schema.Config`).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fsg_endo.engine.schema import Config
from fsg_endo.errors import FsgEndoError


def fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo, bool]]:
    """(dotted key, field, is_section) of every key of the schema, sections before their keys."""
    for name, info in model.model_fields.items():
        section = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        yield f"{prefix}{name}", info, section
        if section:
            yield from fields(info.annotation, f"{prefix}{name}.")


FIELDS = {key: info for key, info, _ in fields()}
LEAVES = [key for key, _, section in fields() if not section]


def describe(annotation: Any) -> str:
    """A type as users read it: ``int``, ``str or null``, ``list[float]``, ``one of a, b``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is list:
        return f"list[{describe(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: Sequence[Any]) -> str:
    """Numeric constraints as users read them: ``> 0``, ``>= 1``, ``in (0, 1]``."""
    lo = hi = None
    metadata = [inner for m in metadata for inner in (m.metadata if isinstance(m, FieldInfo) else [m])]
    for m in metadata:
        if isinstance(m, (annotated_types.Gt, annotated_types.Ge)):
            lo = ("(", m.gt) if isinstance(m, annotated_types.Gt) else ("[", m.ge)
        if isinstance(m, (annotated_types.Lt, annotated_types.Le)):
            hi = (")", m.lt) if isinstance(m, annotated_types.Lt) else ("]", m.le)
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    return f"{'<' if hi[0] == ')' else '<='} {hi[1]:g}" if hi else ""


def _element_bounds(annotation: Any) -> str:
    """The constraint of a value, or of each element of a list, of a field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _bounds(args[1:]) or _element_bounds(args[0])
    if origin in (list, typing.Union, types.UnionType):
        return next((b for b in map(_element_bounds, args) if b), "")
    return ""


def unknown_key(key: str, where: str) -> FsgEndoError:
    """The error for an unknown dotted key, with the closest known key as a suggestion."""
    match = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    if not match:  # a misplaced or misspelt leaf name, e.g. 'lr' or 'optim.learning_rat'
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in LEAVES}
        match = [by_leaf[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf, n=1, cutoff=0.7)]
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return FsgEndoError(f"{where}: unknown config key '{key}'{hint}")


def one_line(err: ValidationError, where: str) -> FsgEndoError:
    """The first problem of a validation error as one line naming ``where``, the key, the value and the rule."""
    first = err.errors(include_url=False)[0]
    kind, value = first["type"], first.get("input")
    key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
    if kind == "extra_forbidden":
        return unknown_key(key, where)
    if not key:  # a check across keys
        return FsgEndoError(f"{where}: {first['ctx']['error'] if 'ctx' in first else first['msg']}")
    info = FIELDS[key]
    if kind == "model_type":
        return FsgEndoError(f"{where}: '{key}' must be a mapping of keys, got {type(value).__name__}")
    if kind in ("too_short", "too_long"):
        size = info.metadata[0].min_length if info.metadata else None
        want = f"{size} values" if kind == "too_long" or size != 1 else "at least one value"
        return FsgEndoError(f"{where}: config key '{key}' must have {want}, got {len(value)}")
    if kind == "literal_error":
        return FsgEndoError(f"{where}: config key '{key}' must be {describe(info.annotation)}; got {value!r}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rule = _bounds(info.metadata) or _element_bounds(info.annotation)
        return FsgEndoError(f"{where}: config key '{key}' must be {rule}, got {value!r}")
    return FsgEndoError(
        f"{where}: config key '{key}' must be {describe(info.annotation)}, got {type(value).__name__} {value!r}"
    )

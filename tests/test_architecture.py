"""The layering of ARCHITECTURE.md: every import (lazy ones inside functions too) points down, no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fsg_endo"

# room -> the rooms it may import from (its own room is always allowed)
ALLOWED = {
    "errors": set(),
    "io": set(),
    "nn": {"errors"},
    "data": {"errors", "io"},
    "synth": {"errors", "io", "data"},
    "tracking": {"errors", "io"},
    "engine": {"errors", "io", "nn", "data", "synth", "tracking"},
    "experiment": {"errors", "io", "nn", "data", "synth", "tracking", "engine"},
    "cli": {"errors", "io", "nn", "data", "synth", "tracking", "engine", "experiment"},
    "__main__": {"cli"},
    "__init__": {"nn"},
}
# third-party packages the torch-only layer may use, besides the standard library (transformers: lazily)
NN_THIRD_PARTY = {"torch", "torchvision", "transformers"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth of the file."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def internal_edges() -> dict[str, set[str]]:
    """module -> the package modules it imports (names that are attributes resolve to their module)."""
    return {
        mod: {name for name in imports_of(path) if name in MODULES and name != mod} for mod, path in MODULES.items()
    }


def test_rooms_are_known():
    assert {room(m) for m in MODULES} <= set(ALLOWED), "a new subpackage needs its row in ALLOWED and ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = room(module)
    bad = sorted(dep for dep in internal_edges()[module] if room(dep) != own and room(dep) not in ALLOWED[own])
    assert not bad, f"{module} ({own}) may not import {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) == "nn"))
def test_nn_needs_torch_only(module):
    third = {name.split(".")[0] for name in imports_of(MODULES[module])} - {"fsg_endo", "__future__"}
    assert third - NN_THIRD_PARTY - set(sys.stdlib_module_names) == set()


# optional third-party packages nn/ may import inside functions only, so that importing fsg_endo never needs them
NN_LAZY_THIRD_PARTY = {"transformers"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) == "nn"))
def test_nn_imports_optional_packages_lazily(module):
    tree = ast.parse(MODULES[module].read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name.split(".")[0] for name in names} & NN_LAZY_THIRD_PARTY


def test_no_import_cycle():
    edges = internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod)


def test_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above can fail: a planted upward, lazy import is an upward edge and closes a cycle."""
    fake = {
        "fsg_endo.nn.a": "def f():\n    from fsg_endo.engine.b import g\n",
        "fsg_endo.engine.b": "from fsg_endo.nn.a import f\n",
    }
    paths = {}
    for mod, text in fake.items():
        path = tmp_path / Path(*mod.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths[mod] = path
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "fsg_endo")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", paths)
    assert "fsg_endo.engine.b" in internal_edges()["fsg_endo.nn.a"]
    with pytest.raises(AssertionError, match="may not import"):
        test_imports_point_down("fsg_endo.nn.a")
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()

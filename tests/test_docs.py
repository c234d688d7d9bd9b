"""The docs hold: the README is a front page, every link resolves, and docs/interfaces.md names every config key
and every command-line flag of the code, so the repository documents its own interfaces."""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import pytest

from fsg_endo.cli import build_parser
from fsg_endo.engine.schema import Config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES += [REPO / "benchmarks" / "README.md", REPO / "data_manifests" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SKIP_DIRS = {".git", ".cache", "runs", "mlruns", "mlartifacts", "__pycache__", ".venv", "build", "dist"}


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


def test_readme_opens_with_the_two_commands_and_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[:6] == [
        "# fsg_endo",
        "",
        "```bash",
        "pip install -e . && python experiments/run.py --exp polyp_size_fsg",
        'pip install -e ".[dev]" && pytest',
        "```",
    ]
    assert len(lines) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_relative_to(REPO) and linked.exists(), f"{page.name}: {target} does not exist"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{page.name}: {target} names no heading of {linked.name}"


def test_no_reference_to_an_outside_specification():
    word = "SP" + "EC"  # spelt apart so this file does not match itself
    hits = [
        f"{path.relative_to(REPO)}:{i}"
        for path in REPO.rglob("*")
        if path.suffix in {".py", ".md", ".ipynb", ".yaml", ".toml"} and not SKIP_DIRS & set(path.parts)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if word in line
    ]
    assert not hits, hits


def test_interfaces_page_names_every_config_key():
    text = (REPO / "docs" / "interfaces.md").read_text(encoding="utf-8")
    keys = flat_keys(Config().model_dump())
    assert "sweep.resources.gpus" in keys and "data.source" in keys  # the flattening reaches nested sections
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"docs/interfaces.md does not document {missing}"


def test_interfaces_page_names_every_command_and_flag():
    text = (REPO / "docs" / "interfaces.md").read_text(encoding="utf-8")
    # each command's paragraph starts with **`fsg-endo NAME ...`** and runs to the next one
    sections = {re.match(r"\w+", part)[0]: part for part in text.split("**`fsg-endo ")[1:]}
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"run", "synth", "manifest", "compare", "report", "evaluate", "predict"} <= set(commands.choices)
    missing = []
    for name, sub in commands.choices.items():
        flags = [f for action in sub._actions for f in action.option_strings if f.startswith("--") and f != "--help"]
        missing += [f"{name} {flag}" for flag in flags if f"{flag}" not in sections.get(name, "")]
    assert not missing, f"docs/interfaces.md does not document {sorted(set(missing))}"


def test_study_page_names_every_arm():
    text = (REPO / "docs" / "study.md").read_text(encoding="utf-8")
    choices = Config.model_fields["regularizer"].annotation
    arms = [getattr(arm, "value", arm) for arm in (typing.get_args(choices) or list(choices))]
    assert {"none", "fsg", "fsg_gr", "fsg_frozen"} <= set(arms)
    missing = [arm for arm in arms if f"`{arm}`" not in text]
    assert not missing, f"docs/study.md does not describe the arms {missing}"

"""The README's minimal example (its first ```python block) runs verbatim."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_minimal_example_runs_verbatim():
    code = first_python_block(README.read_text(encoding="utf-8"))
    assert "from fsg_endo import vit_with_fsg" in code
    out = io.StringIO()
    namespace: dict = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    # what the example prints is what its comment promises, and the model really is gated
    printed = out.getvalue().strip().splitlines()[-1]
    promised = re.search(r"print\(out\.shape\)\s*#\s*(.+)", code)
    assert promised and printed == promised.group(1).strip()
    from fsg_endo import gate_parameters

    assert len(gate_parameters(namespace["model"])) == 2 * 12  # vit_b_16: 12 blocks, two gates each

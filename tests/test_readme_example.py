"""The README's examples run verbatim: the minimal example (its first ```python block), then the others in order."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "README.md has no ```python block"
    return blocks


def test_readme_examples_run_verbatim_in_order():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert "from fsg_endo import vit_with_fsg" in blocks[0]
    namespace: dict = {"__name__": "readme_example"}
    printed = []
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), namespace)
        printed.append(out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else "")
    # what the minimal example prints is what its comment promises, and the model really is gated
    promised = re.search(r"print\(out\.shape\)\s*#\s*(.+)", blocks[0])
    assert promised and printed[0] == promised.group(1).strip()
    from fsg_endo import gate_parameters
    from fsg_endo.nn.gates import gated_blocks

    assert len(gate_parameters(namespace["model"])) == 2 * 12  # vit_b_16: 12 blocks, two gates each
    assert type(namespace["plain"]).__name__ == "VisionTransformer" and not gate_parameters(namespace["plain"])
    assert [type(b).__name__ for b in gated_blocks(namespace["bert"])] == ["BertLayer", "BertLayer"]
    assert printed[-1].startswith("4") and namespace["logits"].shape == (1, 2)

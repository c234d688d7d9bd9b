"""A gated Hugging Face model back from its ``save_pretrained`` folder, gates included.

``save_pretrained`` of a gated model writes the stock state dict plus ``{block}.gate_attn`` and
``{block}.gate_mlp``; ``from_pretrained`` of the stock class builds a stock model and reports those
keys as unexpected. :func:`from_pretrained_with_fsg` loads the stock model that way, gates it with
:func:`~fsg_endo.nn.gates.inject_fsg`, then copies the saved gates in::

    model.save_pretrained(folder)  # model: a transformers model after inject_fsg
    model = from_pretrained_with_fsg(BertForSequenceClassification, folder)
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import inject_fsg

__all__ = ["from_pretrained_with_fsg", "read_saved_gates"]

_GATE_SUFFIXES = (".gate_attn", ".gate_mlp")


def read_saved_gates(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The FSG gate tensors of a ``save_pretrained`` folder (safetensors, else ``.bin``, shards included)."""
    from transformers.modeling_utils import load_state_dict

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FsgEndoError(f"{folder}: no *.safetensors or *.bin weights (expected a save_pretrained folder)")
    gates: dict[str, Tensor] = {}
    for file in files:
        gates.update({k: v for k, v in load_state_dict(str(file)).items() if k.endswith(_GATE_SUFFIXES)})
    return gates


def from_pretrained_with_fsg(model_class: type[nn.Module], folder: str | os.PathLike, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(folder, **kwargs)``, gated, with the gates saved in ``folder``.

    Raises FsgEndoError when the folder holds no gate for one of the model's gated blocks (a stock
    checkpoint: use ``from_pretrained`` then ``inject_fsg`` for fresh gates).
    """
    model = inject_fsg(model_class.from_pretrained(folder, **kwargs))
    wanted = [key for key in model.state_dict() if key.endswith(_GATE_SUFFIXES)]
    if not wanted:
        raise FsgEndoError(f"from_pretrained_with_fsg: {model_class.__name__} holds no block FSG gates")
    saved = read_saved_gates(folder)
    missing = [key for key in wanted if key not in saved]
    if missing:
        raise FsgEndoError(f"{folder}: no saved FSG gate {missing[0]} (a stock checkpoint? use from_pretrained)")
    model.load_state_dict({key: saved[key] for key in wanted}, strict=False)
    return model

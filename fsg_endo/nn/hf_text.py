"""A Hugging Face sequence classifier as the training loop takes a model: ``forward(input_ids, attention_mask)``
returns the logits tensor, and FSG gates its blocks (BERT, RoBERTa, DistilBERT, GPT-2: :mod:`fsg_endo.nn.hf_blocks`).

``transformers`` is imported on first use, so importing this module needs torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fsg_endo.errors import FsgEndoError
from fsg_endo.nn.gates import gated_blocks, inject_fsg
from fsg_endo.nn.models import seeded

__all__ = ["SequenceClassifier", "build_text_classifier"]


class SequenceClassifier(nn.Module):
    """A transformers ``*ForSequenceClassification`` model whose forward returns its logits (B, num_labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def build_text_classifier(
    name_or_folder: str,
    class_names: Sequence[str],
    pretrained: bool = True,
    fsg: bool = False,
    gate_seed: int | None = None,
) -> SequenceClassifier:
    """``AutoModelForSequenceClassification`` of a hub name or local folder with a fresh head over ``class_names``:
    its weights (``pretrained``) or random ones from its config alone. ``fsg`` gates every block; the gates come
    from their own generator seeded by ``gate_seed``, leaving the global RNG where it was, so every arm of one
    seed starts from the same weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names))}
    labels["label2id"] = {name: k for k, name in labels["id2label"].items()}
    try:
        if pretrained:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_folder, **labels, ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(name_or_folder, **labels))
    except (OSError, ValueError) as err:
        what = "weights" if pretrained else "config.json"
        raise FsgEndoError(
            f"model.hf_model={name_or_folder}: no transformers model ({type(err).__name__}); give a hub name on a "
            f"machine with a network, or a local folder with config.json and {what}"
        ) from None
    if pad_missing(model):
        model.config.pad_token_id = model.config.eos_token_id  # GPT-2: the last real token is found by the pad id
    if fsg:
        with seeded(gate_seed):
            inject_fsg(model)
        if not gated_blocks(model):
            raise FsgEndoError(f"model.hf_model={name_or_folder}: {type(model).__name__} has no block FSG gates")
    return SequenceClassifier(model)


def pad_missing(model: nn.Module) -> bool:
    """Whether a decoder classifier (GPT-2) lacks the pad token id it needs to find each sequence's last token."""
    config = model.config
    return getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None

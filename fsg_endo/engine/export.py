"""A trained sizing model as others use it: the settings it must be fed with, and the example it is exported on.

The metadata travels inside the logged MLflow model, so ``fsg-endo evaluate`` and ``predict`` crop and
normalise a new dataset exactly as the model's training data was, without the training config.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fsg_endo.data.text import load_tokenizer
from fsg_endo.engine.recipe import BOX_FEATURES
from fsg_endo.engine.schema import Config
from fsg_endo.engine.tasks import Task
from fsg_endo.nn.gates import fold_gates
from fsg_endo.tracking.tracker import Tracker

PREPROCESS_KEYS = ("image_size", "context", "fov_mask", "mean", "std")


def model_metadata(cfg: Config, task: Task, preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """What a saved model needs besides its weights: task, inputs, crop and normalisation (what the data has
    of :data:`PREPROCESS_KEYS`), and where it came from (experiment, dataset, folds and seed, so ``--fold K``
    of the training data means the same)."""
    return {
        "task": task.name,
        "class_names": list(task.class_names),
        "box_features": cfg.model.box_features,
        **{k: preprocess[k] for k in PREPROCESS_KEYS if k in preprocess},
        "experiment": cfg.name,
        "regularizer": cfg.regularizer,
        "trained_on": cfg.data.source,
        "folds": cfg.data.folds,
        "seed": cfg.seed,
        "test_fold": cfg.data.test_fold,
    }


def example_inputs(metadata: Mapping[str, Any], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the model's input shapes; a batch of 2 keeps the exported batch dimension dynamic."""
    size = metadata["image_size"]
    image = torch.zeros(batch, 3, size, size)
    return (image, torch.zeros(batch, BOX_FEATURES)) if metadata["box_features"] else (image,)


def log_trained_model(
    tracker: Tracker,
    model: torch.nn.Module,
    cfg: Config,
    task: Task,
    preprocess: Mapping[str, Any],
    step: int,
) -> None:
    """Log the model as stock torchvision blocks (gates folded into the weights, fast attention undone) with
    its metadata, linked to the metrics at ``step``; register it as ``tracking.register_model`` if set.
    A ``text_class`` model is logged as a transformers folder instead (:func:`log_transformers_model`)."""
    model = model.cpu().eval()
    metadata = model_metadata(cfg, task, preprocess)
    if task.name == "text_class":
        log_transformers_model(tracker, model, metadata | dict(preprocess))
        return
    tracker.log_model(
        fold_gates(task.exported(model)),
        example_inputs(metadata),
        metadata,
        registered_model_name=cfg.tracking.register_model,
        step=step,
    )


def log_transformers_model(tracker: Tracker, model: torch.nn.Module, metadata: Mapping[str, Any]) -> None:
    """Log a text classifier as the artifact folder ``model/``: the stock transformers model (gates folded in,
    ``save_pretrained``), its tokenizer and ``fsg_endo.json`` (the metadata), so that
    ``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read it back."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fold_gates(model).model.save_pretrained(folder)
        load_tokenizer(metadata["hf_model"]).save_pretrained(folder)
        (folder / "fsg_endo.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        for path in sorted(folder.iterdir()):
            tracker.log_file(path, "model")

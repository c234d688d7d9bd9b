"""The config schema: :data:`DEFAULTS` (every key, its type and default), built-in profiles and checks.

:mod:`fsg_endo.experiment.config` validates every experiment YAML, profile and ``--set`` override against
these tables, so a new config key is added here (and only here) with its default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULTS: dict[str, Any] = {
    "name": "polyp_size_fsg",
    "task": "size_regression",
    "regularizer": "fsg_gr",
    "seed": 0,  # fixes data generation (synthetic), low-data split, init, sampling, augmentation
    "device": "auto",
    "data": {
        "source": "synthetic",
        "root": None,  # dataset root (synthetic: default cache folder .cache/synthetic_s{seed}_v{videos})
        "manifest": None,  # manifest CSV (default: built from root and cached beside it)
        "sizes": None,  # SUN only: CSV with case,size_mm
        "videos": None,  # synthetic: number of videos (None = the generator's default)
        "synthetic_seed": None,  # synthetic: generator seed (None = seed)
        "folds": 5,
        "test_fold": 0,
        "val_fold": 1,
        "train_fraction": 1.0,
        "image_size": 64,
        "context": 0.5,  # crop margin around the box, as a share of the box side on each side
        "fov_mask": True,
        "frames_per_lesion": 20,  # frames drawn per lesion per training epoch (paper: 40, the paper profile)
        "eval_frames_per_lesion": None,  # cap on frames per lesion at evaluation (None = all)
        "class_balanced": False,
        "cache": "memory",
        "source_media": "frames",
        "workers": 0,
        "augment": True,
    },
    "model": {
        "preset": "micro",
        "patch_size": 8,
        "hidden_dim": None,  # None = the preset's
        "depth": None,
        "heads": None,
        "mlp_dim": None,
        "box_features": True,  # log box width/height joined to the class token before the head
        "weights": None,  # local weight file (torchvision or timm ViT)
        "dropout": 0.1,  # used by regularizer=dropout only
        "attention_dropout": 0.1,  # used by regularizer=dropout only
        "stochastic_depth": 0.1,  # used by regularizer=dropout only
    },
    "optim": {
        "epochs": 15,
        "batch_size": 32,
        "lr": 5.0e-4,
        "weight_decay": 1.0e-5,
        "clip": 10.0,
        "warmup_epochs": 1,
        "amp": True,  # bf16 autocast on CUDA only
        "max_skipped_steps": 10,  # non-finite (NaN/Inf) steps skipped before the run stops as FAILED
    },
    "gr": {"gate_lr": 1.0e-3, "gate_clip": 32.0, "accumulate_gate_pass_grads": False},
    "loss": {"main_weights": [1.0, 3.0, 5.0], "gate_weights": [1.0, 5.0, 10.0]},  # size <=5, 5-10, >=10 mm
    "eval": {
        "every": 1,  # evaluate every N epochs
        "metric": "auto",  # auto = the task's main metric on val
    },
    "gates": {
        "sparsity_threshold": 0.1,
        "log_every": 20,  # steps between gate-statistics logs
    },
    "tracking": {
        "uri": None,  # MLFLOW_TRACKING_URI > --tracking-uri > this > sqlite:///mlflow.db
        "log_every": 10,  # steps between train-metric logs
        "log_model": True,
        "plots": True,
    },
    "checkpoint": {
        "dir": None,  # None = runs/<run_id>/ in the working directory
        "every": 1,  # epochs between checkpoints
    },
    "sweep": {  # regularization_sweep only (ignored for single runs)
        "enabled": False,  # run one child per (regularizer, train fraction, fold, seed) instead of one run
        "regularizers": ["none", "dropout", "fsg", "fsg_gr"],
        "train_fractions": [0.1, 0.25, 0.5, 1.0],
        "folds": [0],
        "seeds": [0],
    },
}

# built-in --smoke overrides: a few steps on tiny data
SMOKE: dict[str, Any] = {
    "data.videos": 4,
    "data.frames_per_lesion": 4,
    "data.eval_frames_per_lesion": 4,
    "data.image_size": 32,
    "data.folds": 3,
    "data.test_fold": 0,
    "data.val_fold": 1,
    "model.hidden_dim": 32,
    "model.depth": 2,
    "model.heads": 2,
    "model.mlp_dim": 64,
    "optim.epochs": 2,
    "optim.batch_size": 8,
    "optim.warmup_epochs": 0,
    "gates.log_every": 2,
    "tracking.log_every": 1,
    "sweep.train_fractions": [0.5, 1.0],
    "sweep.folds": [0],
    "sweep.seeds": [0],
}

# built-in profiles (--profile NAME); a YAML's profile of the same name extends its built-in one
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {  # the paper's setting, for a GPU: ViT-Ti at 384 px, its optimisers, clips and loss weights
        "data": {"image_size": 384, "frames_per_lesion": 40},
        "model": {"preset": "ti", "patch_size": 16},
        "optim": {"epochs": 40, "lr": 5.0e-5, "weight_decay": 1.0e-5, "clip": 10.0},
        "gr": {"gate_lr": 1.0e-4, "gate_clip": 32.0},
        "loss": {"main_weights": [1.0, 3.0, 5.0], "gate_weights": [1.0, 5.0, 10.0]},
    },
}

REGULARIZERS = ("none", "dropout", "fsg", "fsg_gr")
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("size_regression", "size_class3", "size_class2", "image_class"),  # image_class: demos only
    "regularizer": REGULARIZERS,
    "device": ("auto", "cpu", "cuda"),
    "data.source": ("synthetic", "realcolon", "sun", "cifar100"),  # cifar100: demos only
    "data.cache": ("none", "memory", "disk"),
    "data.source_media": ("frames", "video"),
    "model.preset": ("micro", "ti", "s", "b"),
    "sweep.regularizers": REGULARIZERS,
}
# types of the keys whose default is None (None stays allowed for them)
NULLABLE: dict[str, type] = {
    "data.root": str, "data.manifest": str, "data.sizes": str, "data.videos": int,
    "data.synthetic_seed": int, "data.eval_frames_per_lesion": int, "model.hidden_dim": int,
    "model.depth": int, "model.heads": int, "model.mlp_dim": int, "model.weights": str,
    "tracking.uri": str, "checkpoint.dir": str,
}
DERIVED = {"fsg.enabled": "regularizer in {fsg, fsg_gr}", "gr.enabled": "regularizer == fsg_gr"}

_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
# per-value range checks (applied to each element of a list)
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _NON_NEGATIVE, "data.videos": _AT_LEAST_1, "data.synthetic_seed": _NON_NEGATIVE,
    "data.folds": (lambda v: v >= 2, ">= 2"), "data.train_fraction": _FRACTION,
    "data.image_size": _AT_LEAST_1, "data.context": _NON_NEGATIVE, "data.frames_per_lesion": _AT_LEAST_1,
    "data.eval_frames_per_lesion": _AT_LEAST_1, "data.workers": _NON_NEGATIVE,
    "model.patch_size": _AT_LEAST_1, "model.hidden_dim": _AT_LEAST_1, "model.depth": _AT_LEAST_1,
    "model.heads": _AT_LEAST_1, "model.mlp_dim": _AT_LEAST_1, "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.attention_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.stochastic_depth": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.epochs": _AT_LEAST_1, "optim.batch_size": _AT_LEAST_1, "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE, "optim.clip": _POSITIVE, "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.max_skipped_steps": _NON_NEGATIVE,
    "gr.gate_lr": _POSITIVE, "gr.gate_clip": _POSITIVE, "loss.main_weights": _POSITIVE,
    "loss.gate_weights": _POSITIVE, "eval.every": _AT_LEAST_1,
    "gates.sparsity_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"), "gates.log_every": _AT_LEAST_1,
    "tracking.log_every": _AT_LEAST_1, "checkpoint.every": _AT_LEAST_1,
    "sweep.train_fractions": _FRACTION, "sweep.seeds": _NON_NEGATIVE, "sweep.folds": _NON_NEGATIVE,
}
LIST_LENGTHS = {"loss.main_weights": 3, "loss.gate_weights": 3}

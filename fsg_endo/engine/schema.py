"""The config schema, declared once as typed pydantic models: every key, its type, default and constraint.

The defaults are the main job's recipe (``polyp_size_fsg``: size regression on the synthetic videos, a log-box
head on 16 px patches, 26 epochs); an experiment YAML states only what differs. :mod:`fsg_endo.experiment.config`
validates every YAML, profile and ``--set`` override against :class:`Config` and hands the typed, frozen
:class:`Config` to the engine, which reads it by attribute (``cfg.optim.epochs``). The built-in ``--smoke``
overrides and profiles are partial configs, validated like a YAML.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from fsg_endo.engine.arms import ARM_NAMES, ARMS, arms_where

Regularizer = Literal[ARM_NAMES]  # the arms of the study: one row each in fsg_endo.engine.arms.ARMS
REGULARIZERS: tuple[str, ...] = ARM_NAMES
POLYP_SOURCES = ("synthetic", "realcolon", "sun")
IMAGE_SOURCES = ("mnist", "imagenette", "cifar100")
TEXT_SOURCES = ("text_csv", "hf_dataset")  # the user's CSV of text,label; a Hugging Face dataset by name
SOURCES_OF_TASK: dict[str, tuple[str, ...]] = {  # the data sources each task reads
    "size_regression": POLYP_SOURCES,
    "size_class3": POLYP_SOURCES,
    "size_class2": POLYP_SOURCES,
    "image_class": IMAGE_SOURCES,
    "text_class": TEXT_SOURCES,
    "pretrain_mae": ("synthetic", "frames"),  # a pool of synthetic videos of its own seed, or a folder of frames
}
CLASS_TASKS = ("image_class", "text_class")  # a dataset's own classes: no box, no lesions, no polyp baseline
TaskName = Literal[tuple(SOURCES_OF_TASK)]
DataSource = Literal[tuple(dict.fromkeys(s for sources in SOURCES_OF_TASK.values() for s in sources))]

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Rate = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=1)]
NonEmpty = Field(min_length=1)


class Section(BaseModel):
    """A config section: unknown keys are errors, and values keep their YAML type (no '3' for 3)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)


class Data(Section):
    source: DataSource = "synthetic"
    # dataset root (synthetic: default cache folder .cache/synthetic_s{seed}_v{videos}); text_csv: the CSV file;
    # hf_dataset: a Hugging Face dataset name or local folder
    root: str | None = None
    manifest: str | None = None  # manifest CSV (default: built from root and cached beside it)
    sizes: str | None = None  # SUN only: CSV with case,size_mm
    videos: Count | None = None  # synthetic: number of videos (None = the generator's default)
    synthetic_seed: NonNegativeInt | None = None  # synthetic: generator seed (None = seed)
    split_seed: NonNegativeInt | None = None  # the manifest's folds and the low-data split (None = seed)
    folds: Annotated[int, Field(ge=2)] = 5
    test_fold: int = 0
    val_fold: int = 1
    train_fraction: Fraction = 1.0
    image_size: Count = 64
    context: Annotated[float, Field(ge=0)] = 0.5  # crop margin around the box, share of the box side per side
    fov_mask: bool = True
    frames_per_lesion: Count = 20  # frames drawn per lesion per training epoch (paper: 40, the paper profile)
    eval_frames_per_lesion: Count | None = None  # cap on frames per lesion at evaluation (None = all)
    class_balanced: bool = False
    cache: Literal["none", "memory", "disk"] = "memory"
    source_media: Literal["frames", "video"] = "frames"
    workers: NonNegativeInt = 0
    augment: bool = True
    photometric: bool = True  # polyp tasks: the augmentation's colour jitter and noise (false: rotation and flips)
    # tasks image_class and text_class only (TASK_KEYS: refused for the other tasks)
    train_limit: Count | None = None  # at most this many training images (texts) read (after train_fraction)
    test_limit: Count | None = None  # at most this many held-out (test) images (texts)
    # task image_class only
    shift: NonNegativeInt = 4  # augmentation: random translation by up to this many pixels
    flip: bool = True  # augmentation: random left-right mirror
    # task text_class only
    text_column: str = "text"  # the column of the texts
    label_column: str = "label"  # the column of the labels
    max_length: Count = 128  # tokens per text at most (truncated)


class Model(Section):
    preset: Literal["micro", "ti", "s", "b"] = "micro"
    patch_size: Count = 16
    hidden_dim: Count | None = None  # None = the preset's
    depth: Count | None = None
    heads: Count | None = None
    mlp_dim: Count | None = None
    box_features: bool = True  # log box width/height joined to the class token before the head
    size_head: Literal["linear", "log_box"] = "log_box"  # log_box (size_regression): predicts log(size / box side)
    # pretrained ViT (docs/backbones.md): a local file (torchvision, timm, the paper's release with its gates),
    # torchvision:<weights enum>, timm:<model name>, runs:/<run id>/<path>, models:/<name>/<version or alias>;
    # the ViT's shape follows the weights (set shape keys must agree), position embeddings fit data.image_size
    weights: str | None = None
    dropout: Rate = 0.1  # used by regularizer=dropout only
    attention_dropout: Rate = 0.1  # used by regularizer=dropout only
    stochastic_depth: Rate = 0.1  # used by regularizer=dropout only
    # task text_class only (TASK_KEYS): its transformers model, a hub name or a local folder (with its tokenizer),
    # with its own weights or random ones from its config
    hf_model: str | None = None
    hf_init: Literal["pretrained", "random"] = "pretrained"


class Pretrain(Section):
    """Task pretrain_mae only: the masked autoencoder (He et al. 2022) and its corpus of crops."""

    mask_ratio: Rate = 0.75  # share of each crop's patches hidden from the encoder
    decoder_dim: Count = 128  # the light decoder's width
    decoder_depth: Count = 2  # ... its blocks
    decoder_heads: Count = 4  # ... its attention heads
    normalize_patches: bool = False  # true: MAE's per-patch normalised pixel loss (drops each patch's brightness)
    crops_per_frame: Count = 2  # crop boxes drawn per frame, sized and placed like the sizing task's
    # data.source frames (no boxes): crop sides relative to the frame's shorter side, drawn log-uniformly
    crop_sides: Annotated[list[Annotated[float, Field(gt=0, le=0.7)]], Field(min_length=2, max_length=2)] = [0.05, 0.4]
    picture_every: Count = 5  # epochs between pictures of the reconstructions of a fixed validation batch


class Optim(Section):
    epochs: Count = 26
    batch_size: Count = 32
    lr: PositiveFloat = 5.0e-4
    weight_decay: Annotated[float, Field(ge=0)] = 1.0e-5
    decoupled_weight_decay: bool = False  # true: AdamW's decay (MAE pretraining's); false: Adam's L2 term
    clip: PositiveFloat = 10.0
    warmup_epochs: NonNegativeInt = 1
    amp: bool = True  # bf16 autocast on CUDA only
    compile: bool = False  # torch.compile the trained model, on CUDA only (ignored on CPU); the paper profile sets it
    max_skipped_steps: NonNegativeInt = 10  # non-finite (NaN/Inf) steps skipped before the run stops as FAILED


class GradientRouting(Section):
    gate_lr: PositiveFloat = 1.0e-3
    gate_clip: PositiveFloat = 32.0
    accumulate_gate_pass_grads: bool = False


ClassWeights = Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]  # size <=5, 5-10, >=10 mm


class Loss(Section):
    main_weights: ClassWeights = [1.0, 3.0, 5.0]
    gate_weights: ClassWeights = [1.0, 5.0, 10.0]
    beta: PositiveFloat = 1.0  # smooth-L1 is quadratic below beta (scaled units; 1 mm = 0.103): 1 is PyTorch's


class Eval(Section):
    every: Count = 1  # evaluate every N epochs
    metric: str = "auto"  # auto = the task's main metric on val


class Gates(Section):
    sparsity_threshold: Annotated[float, Field(ge=0, le=1)] = 0.1
    log_every: Count = 20  # steps between gate-statistics logs


class Tracking(Section):
    uri: str | None = None  # MLFLOW_TRACKING_URI > --tracking-uri > this > sqlite:///mlflow.db
    log_every: Count = 10  # steps between train-metric logs
    log_model: bool = True
    register_model: str | None = None  # a Model Registry name: register the logged model under it
    system_metrics: bool = False  # log CPU, memory and GPU use (psutil, nvidia-ml-py) beside the run
    plots: bool = True


class Checkpoint(Section):
    dir: str | None = None  # None = runs/<run_id>/ in the working directory
    every: Count = 1  # epochs between checkpoints


class Resources(Section):
    """What one sweep child asks of Ray: CPUs (also its torch threads) and a share of a GPU (0.25: four per GPU)."""

    cpus: PositiveFloat = 1.0
    gpus: Annotated[float, Field(ge=0)] = 0.0


class Sweep(Section):
    """How a sweep varies its children (ignored for single runs, but for ``variant``, which applies to any run)."""

    enabled: bool = False  # one child per (regularizer, train fraction, grid point, fold, seed), not one run
    regularizers: Annotated[list[Regularizer], NonEmpty] = ["none", "dropout", "fsg", "fsg_gr"]
    train_fractions: Annotated[list[Fraction], NonEmpty] = [0.1, 0.25, 0.5, 1.0]
    folds: Annotated[list[NonNegativeInt], NonEmpty] = [0]
    seeds: Annotated[list[NonNegativeInt], NonEmpty] = [0]
    # more axes: {"dotted.key": [values, ...]}, e.g. {"gr.gate_lr": [1e-3, 1e-2]}; each value checked like --set
    grid: dict[str, Any] = {}
    # named sets of overrides, one axis: {"relw": {"loss.main_weights": [1, 0.4, 0.2], ...}}; grid label variant=NAME
    variants: dict[str, dict[str, Any]] = {}
    variant: str | None = None  # one of variants: applied to this config (a sweep runs only it; children: theirs)
    fold_role: Literal["test", "validation"] = "test"  # validation: every child keeps data.test_fold, folds validate
    seed_role: Literal["all", "training"] = "all"  # training: seeds keep the base seed's data and folds
    executor: Literal["ray", "sequential"] = "ray"  # ray: children side by side on Ray (local or --ray-address)
    max_concurrent: Count | None = None  # children at once (None = CPUs / resources.cpus, capped by GPUs / gpus)
    resources: Resources = Resources()
    max_retries: NonNegativeInt = 1  # re-runs of a child whose worker died, from its checkpoint into the same run


class Config(Section):
    """A whole experiment config. ``fsg.enabled`` / ``gr.enabled`` are not keys: they follow from
    ``regularizer`` (see :func:`fsg_endo.engine.recipe.uses_gates`) and are logged as params."""

    name: str = "polyp_size_fsg"
    task: TaskName = "size_regression"
    regularizer: Regularizer = "fsg_gr"
    seed: NonNegativeInt = 0  # fixes data generation (synthetic), low-data split, init, sampling, augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: Data = Data()
    model: Model = Model()
    optim: Optim = Optim()
    gr: GradientRouting = GradientRouting()
    loss: Loss = Loss()
    eval: Eval = Eval()
    gates: Gates = Gates()
    tracking: Tracking = Tracking()
    checkpoint: Checkpoint = Checkpoint()
    sweep: Sweep = Sweep()
    pretrain: Pretrain = Pretrain()

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Config:
        """Checks across keys; skipped while a config is assembled layer by layer (context partial)."""
        if (info.context or {}).get("partial"):
            return self
        data, model, optim = self.data, self.model, self.optim
        for key in ("test_fold", "val_fold"):
            if not 0 <= getattr(data, key) < data.folds:
                raise ValueError(f"'data.{key}' = {getattr(data, key)} is not a fold of data.folds = {data.folds}")
        if data.test_fold == data.val_fold:
            raise ValueError(f"'data.test_fold' and 'data.val_fold' are both {data.val_fold}")
        sweep = self.sweep
        bad = [f for f in sweep.folds if f >= data.folds]
        if bad:
            raise ValueError(f"'sweep.folds' {bad} are not folds of data.folds = {data.folds}")
        if sweep.fold_role == "validation" and data.test_fold in sweep.folds:
            raise ValueError(
                f"'sweep.folds' {sweep.folds} hold 'data.test_fold' = {data.test_fold}, which "
                "'sweep.fold_role' = validation keeps out of training and of the choice"
            )
        if sweep.variant is not None and sweep.variant not in sweep.variants:
            raise ValueError(
                f"'sweep.variant' = {sweep.variant} is not a key of 'sweep.variants' ({', '.join(sweep.variants)})"
            )
        if data.image_size % model.patch_size:
            raise ValueError(
                f"'data.image_size' = {data.image_size} is not a multiple of 'model.patch_size' = {model.patch_size}"
            )
        if model.hidden_dim is not None and model.heads is not None and model.hidden_dim % model.heads:
            raise ValueError(
                f"'model.hidden_dim' = {model.hidden_dim} is not divisible by 'model.heads' = {model.heads}"
            )
        if data.source not in SOURCES_OF_TASK[self.task]:
            raise ValueError(
                f"task {self.task} does not read 'data.source' = {data.source}: it reads "
                f"{', '.join(SOURCES_OF_TASK[self.task])}"
            )
        if self.task in CLASS_TASKS and model.box_features:
            raise ValueError(f"'model.box_features' must be false for task {self.task} (no box)")
        if model.size_head == "log_box" and not (self.task == "size_regression" and model.box_features):
            raise ValueError(
                "'model.size_head' = log_box needs task size_regression and 'model.box_features' = true "
                "(set model.size_head: linear)"
            )
        if self.task in CLASS_TASKS and not ARMS[self.regularizer].trained:
            raise ValueError(f"regularizer {self.regularizer} is a polyp sizing baseline; task {self.task} has none")
        if self.task == "text_class":
            _check_text(self)
        if self.task == "pretrain_mae":
            _check_pretraining(self)
        if optim.warmup_epochs > optim.epochs:
            raise ValueError(f"'optim.warmup_epochs' = {optim.warmup_epochs} exceeds 'optim.epochs' = {optim.epochs}")
        return self


def _check_pretraining(cfg: Config) -> None:
    """What a pretraining config must say: the plain ViT, no box, and a pool of videos of its own seed."""
    if cfg.regularizer != "none":
        raise ValueError(f"task pretrain_mae trains the plain ViT: set regularizer: none, not {cfg.regularizer}")
    if cfg.model.box_features:
        raise ValueError("'model.box_features' must be false for task pretrain_mae (the encoder sees crops only)")
    if cfg.data.source == "synthetic" and cfg.data.synthetic_seed is None:
        raise ValueError(
            "task pretrain_mae needs 'data.synthetic_seed': the generator seed of its pool of unlabelled videos, "
            "one that no sizing dataset uses (the shipped pretrain_mae sets 1000)"
        )


def _check_text(cfg: Config) -> None:
    """What a text classification config must say: its transformers model, and an arm that is not the ViT's alone."""
    arm = ARMS[cfg.regularizer]
    if cfg.model.hf_model is None:
        raise ValueError("task text_class needs 'model.hf_model': a hub name or a local transformers folder")
    if arm.dropout or arm.model_options:
        raise ValueError(
            f"regularizer {arm.name} is an arm of the study's ViT; task text_class trains a transformers model "
            "(its own dropout): none, or an FSG arm"
        )


# keys only some tasks read: setting one for another task is an error naming the key
TASK_KEYS: dict[str, tuple[str, ...]] = {
    **{f"pretrain.{key}": ("pretrain_mae",) for key in Pretrain.model_fields},
    "data.train_limit": CLASS_TASKS,
    "data.test_limit": CLASS_TASKS,
    "data.shift": ("image_class",),
    "data.flip": ("image_class",),
    "data.text_column": ("text_class",),
    "data.label_column": ("text_class",),
    "data.max_length": ("text_class",),
    "model.hf_model": ("text_class",),
    "model.hf_init": ("text_class",),
}

# keys that follow from another key: asked for by users, so setting one says where it comes from
DERIVED = {
    "fsg.enabled": f"regularizer in {{{', '.join(arms_where('gated'))}}}",
    "gr.enabled": f"regularizer in {{{', '.join(arms_where('routed'))}}}",
}
# keys a sweep varies by its own axes (sweep.regularizers, train_fractions, folds, seeds): no grid axis
SWEEP_AXES = ("regularizer", "seed", "data.train_fraction", "data.test_fold", "data.val_fold", "name")

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
    "model.weights": None,  # random weights: pretraining a backbone is no smoke (--set model.weights=... after it)
    "optim.epochs": 2,
    "optim.batch_size": 8,
    "optim.warmup_epochs": 0,
    "gates.log_every": 2,
    "tracking.log_every": 1,
    "sweep.train_fractions": [0.5, 1.0],
    "sweep.folds": [0],
    "sweep.seeds": [0],
}
SMOKE_OF_TASK: dict[str, dict[str, Any]] = {
    **{task: {"data.train_limit": 48, "data.test_limit": 24} for task in CLASS_TASKS},
    "pretrain_mae": {"pretrain.picture_every": 1},
}
SMOKE_OF_FOLD_ROLE: dict[str, dict[str, Any]] = {"validation": {"sweep.folds": [1]}}  # smoke's validation fold

# built-in profiles (--profile NAME); a YAML's profile of the same name extends its built-in one
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {  # the paper's setting, for a GPU: ViT-Ti at 384 px, its optimisers, clips and loss weights
        "data": {"image_size": 384, "frames_per_lesion": 40},
        "model": {
            "preset": "ti",
            "patch_size": 16,
            "size_head": "linear",
            "weights": "timm:vit_tiny_patch16_384.augreg_in21k_ft_in1k",  # the paper's ImageNet-21k ViT-Ti
        },
        "optim": {"epochs": 40, "lr": 5.0e-5, "weight_decay": 1.0e-5, "clip": 10.0, "compile": True},
        "gr": {"gate_lr": 1.0e-4, "gate_clip": 32.0},
        "loss": {"main_weights": [1.0, 3.0, 5.0], "gate_weights": [1.0, 5.0, 10.0]},
    },
}

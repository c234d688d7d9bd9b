"""The polyp sizing tasks, ``image_class`` and ``text_class`` (docs/interfaces.md#tasks-and-metrics): targets,
losses, metrics.

A :class:`Task` turns a collated pipeline batch (keys ``target_reg``, ``size_mm``,
``size_class3``, ``size_class2``, ``lesion_id``, ``video_id``, ``frame_id``) into loss targets,
model outputs into numpy predictions, and predictions into frame- and lesion-level metrics.
``image_class`` reads image batches (``label``, ``image_id``) and has no lesion level; ``text_class`` the same
from token batches (``label``, ``text_id``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fsg_endo.data.sizes import CLASS2_NAMES, CLASS3_NAMES, scale_size, size_class2, size_class3, unscale_size
from fsg_endo.engine.metrics import classification_metrics, confusion_matrix, regression_metrics
from fsg_endo.errors import FsgEndoError
from fsg_endo.tracking import plots

ID_COLUMNS = ("lesion_id", "video_id", "frame_id")
TASK_NAMES = ("size_regression", "size_class3", "size_class2", "image_class", "text_class", "pretrain_mae")
MAX_NAMED_CLASSES = 20  # image_class: per-class F1 named after the classes up to this many classes


def _numpy(value: Any) -> np.ndarray:
    """A batch field (tensor, list or array) as a 1-D numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).reshape(-1)


class Task(ABC):
    """Common interface of the sizing tasks; subclasses fill in the task-specific parts."""

    name: str
    kind: str
    num_outputs: int
    main_metric: str
    mode: str
    class_names: tuple[str, ...]  # labels of the confusion matrix
    lesion_level = False  # whether predictions also aggregate per lesion (``lesion/{split}/*``): a LesionTask

    @abstractmethod
    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The tensor that :meth:`main_loss` and :meth:`gate_loss` compare the outputs with."""

    @abstractmethod
    def main_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the backbone (main) optimiser."""

    @abstractmethod
    def gate_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the gate optimiser in Gradient Routing."""

    @abstractmethod
    def outputs_to_numpy(self, outputs: torch.Tensor) -> np.ndarray:
        """Model outputs as predictions: mm (B,) for regression, probabilities (B, C) for classes."""

    @abstractmethod
    def frame_predictions(self, batch: Mapping[str, Any], outputs_np: np.ndarray) -> pd.DataFrame:
        """One row per frame: ids, ``target``, ``prediction``, ``size_mm`` (+ ``prob_k`` for classes)."""

    @abstractmethod
    def compute_metrics(self, pred_df: pd.DataFrame) -> dict[str, float]:
        """Metrics of a frame- or lesion-level prediction table (see :mod:`fsg_endo.engine.metrics`)."""

    @abstractmethod
    def confusion(self, pred_df: pd.DataFrame) -> np.ndarray:
        """Confusion matrix (rows true, columns predicted) over :attr:`class_names`."""

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a run logs as its model (the trained model itself; the pretraining task's encoder)."""
        return model

    def figures(self, model: torch.nn.Module, loader: Any, epoch: int, device: torch.device) -> dict[str, Any]:
        """Pictures the task draws after epoch ``epoch`` (artifact path -> matplotlib figure); none by default."""
        return {}

    def _id_frame(self, batch: Mapping[str, Any]) -> pd.DataFrame:
        """The id columns and ``size_mm`` of a batch."""
        df = pd.DataFrame({key: _numpy(batch[key]) for key in ID_COLUMNS})
        df["size_mm"] = _numpy(batch["size_mm"]).astype(float)
        return df

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LesionTask(Task):
    """A polyp task: frames of a lesion aggregate into one lesion-level prediction (``lesion/{split}/*``)."""

    lesion_level = True

    @abstractmethod
    def lesion_predictions(self, frame_df: pd.DataFrame) -> pd.DataFrame:
        """One row per lesion, predicted from the mean over its frames; adds ``n_frames``."""


class RegressionTask(LesionTask):
    """``size_regression``: one output, the size scaled to [-1, 1]; size-weighted smooth-L1.

    ``targets`` is (B, 3) float: scaled size, main-loss weight, gate-loss weight. The weights are
    looked up on the CPU by size class (docs/interfaces.md#size-classes), so each loss is a few elementwise ops.
    Each loss is the weighted mean ``sum(w * l) / sum(w)``: the weights shift emphasis between
    size classes without changing the loss scale, so learning rates do not depend on the weights.
    """

    kind, num_outputs, main_metric, mode = "regression", 1, "mae", "min"
    class_names = CLASS3_NAMES

    def __init__(self, main_weights: Sequence[float], gate_weights: Sequence[float], beta: float = 1.0) -> None:
        self.name = "size_regression"
        self.beta = beta
        self.main_weights = np.asarray(main_weights, dtype=np.float32)
        self.gate_weights = np.asarray(gate_weights, dtype=np.float32)
        for weights in (self.main_weights, self.gate_weights):
            if weights.shape != (3,) or not (weights > 0).all():
                raise FsgEndoError(f"size_regression: loss weights must be 3 positive numbers, got {weights}")

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        size_mm = _numpy(batch["size_mm"]).astype(float)
        scaled = _numpy(batch["target_reg"]) if "target_reg" in batch else scale_size(size_mm)
        cls = size_class3(size_mm)
        columns = np.stack([scaled, self.main_weights[cls], self.gate_weights[cls]], axis=1)
        return torch.as_tensor(columns, dtype=torch.float32)

    def _weighted_smooth_l1(self, outputs: torch.Tensor, targets: torch.Tensor, column: int) -> torch.Tensor:
        """Weighted mean of the smooth-L1 (quadratic below ``beta``) between the output and the scaled size."""
        pred = outputs.reshape(-1).float()
        loss = F.smooth_l1_loss(pred, targets[:, 0], reduction="none", beta=self.beta)
        weight = targets[:, column]
        return (weight * loss).sum() / weight.sum()

    def main_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._weighted_smooth_l1(outputs, targets, 1)

    def gate_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._weighted_smooth_l1(outputs, targets, 2)

    def outputs_to_numpy(self, outputs: torch.Tensor) -> np.ndarray:
        return unscale_size(outputs.detach().float().cpu().numpy().reshape(-1))

    def frame_predictions(self, batch: Mapping[str, Any], outputs_np: np.ndarray) -> pd.DataFrame:
        df = self._id_frame(batch)
        df.insert(3, "target", df["size_mm"])
        df.insert(4, "prediction", np.asarray(outputs_np, dtype=float).reshape(-1))
        return df

    def lesion_predictions(self, frame_df: pd.DataFrame) -> pd.DataFrame:
        grouped = frame_df.groupby("lesion_id", sort=True)
        out = grouped.agg(
            video_id=("video_id", "first"),
            target=("target", "first"),
            prediction=("prediction", "mean"),
            size_mm=("size_mm", "first"),
            n_frames=("prediction", "size"),
        )
        return out.reset_index()

    def compute_metrics(self, pred_df: pd.DataFrame) -> dict[str, float]:
        true_mm, pred_mm = pred_df["target"].to_numpy(float), pred_df["prediction"].to_numpy(float)
        out = regression_metrics(true_mm, pred_mm)
        cls3 = classification_metrics(size_class3(true_mm), size_class3(pred_mm), 3, names=CLASS3_NAMES)
        # the predicted size itself ranks lesions for the >= 10 mm AUROC
        cls2 = classification_metrics(size_class2(true_mm), size_class2(pred_mm), 2, prob=pred_mm, names=CLASS2_NAMES)
        out.update({f"cls3_{k}": v for k, v in cls3.items()})
        out.update({f"cls2_{k}": v for k, v in cls2.items()})
        return out

    def confusion(self, pred_df: pd.DataFrame) -> np.ndarray:
        true_mm, pred_mm = pred_df["target"].to_numpy(float), pred_df["prediction"].to_numpy(float)
        return confusion_matrix(size_class3(true_mm), size_class3(pred_mm), 3)


class CrossEntropyTask(Task):
    """Logits over named classes, cross-entropy for both losses, probabilities as predictions."""

    kind, main_metric, mode = "classification", "balanced_accuracy", "max"

    def __init__(self, name: str, class_names: Sequence[str]) -> None:
        self.name = name
        self.class_names = tuple(class_names)
        self.num_outputs = len(self.class_names)
        self.prob_columns = [f"prob_{k}" for k in range(self.num_outputs)]

    def main_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def gate_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def outputs_to_numpy(self, outputs: torch.Tensor) -> np.ndarray:
        return torch.softmax(outputs.detach().float(), dim=1).cpu().numpy()

    def confusion(self, pred_df: pd.DataFrame) -> np.ndarray:
        return confusion_matrix(pred_df["target"].to_numpy(int), pred_df["prediction"].to_numpy(int), self.num_outputs)


class ClassificationTask(CrossEntropyTask, LesionTask):
    """``size_class3`` / ``size_class2``: logits over the size classes, per frame and per lesion."""

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.as_tensor(_numpy(batch[self.name]).astype(np.int64))

    def frame_predictions(self, batch: Mapping[str, Any], outputs_np: np.ndarray) -> pd.DataFrame:
        prob = np.asarray(outputs_np, dtype=float).reshape(-1, self.num_outputs)
        df = self._id_frame(batch)
        df.insert(3, "target", _numpy(batch[self.name]).astype(int))
        df.insert(4, "prediction", prob.argmax(axis=1))
        df[self.prob_columns] = prob
        return df

    def lesion_predictions(self, frame_df: pd.DataFrame) -> pd.DataFrame:
        grouped = frame_df.groupby("lesion_id", sort=True)
        out = grouped.agg(
            video_id=("video_id", "first"),
            target=("target", "first"),
            size_mm=("size_mm", "first"),
            n_frames=("target", "size"),
        )
        prob = grouped[self.prob_columns].mean()
        out.insert(2, "prediction", prob.to_numpy().argmax(axis=1))
        return pd.concat([out, prob], axis=1).reset_index()

    def compute_metrics(self, pred_df: pd.DataFrame) -> dict[str, float]:
        prob = pred_df[self.prob_columns].to_numpy(float) if set(self.prob_columns) <= set(pred_df) else None
        return classification_metrics(
            pred_df["target"].to_numpy(int),
            pred_df["prediction"].to_numpy(int),
            self.num_outputs,
            prob=prob,
            names=self.class_names,
        )


class ImageClassTask(CrossEntropyTask):
    """``image_class``: logits over a dataset's classes (MNIST, Imagenette, CIFAR-100); one row per image."""

    main_metric = "accuracy"
    id_column = "image_id"  # the batch key and prediction column that names each item

    def __init__(self, class_names: Sequence[str], name: str = "image_class") -> None:
        if not class_names:
            raise FsgEndoError(f"{name}: no class names (they come from the task's dataset)")
        super().__init__(name, class_names)

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.as_tensor(_numpy(batch["label"]).astype(np.int64))

    def frame_predictions(self, batch: Mapping[str, Any], outputs_np: np.ndarray) -> pd.DataFrame:
        """One row per item: id, target and prediction (indices and names), the predicted class's probability."""
        prob = np.asarray(outputs_np, dtype=float).reshape(-1, self.num_outputs)
        target, pred = _numpy(batch["label"]).astype(int), prob.argmax(axis=1)
        names = np.asarray(self.class_names, dtype=object)
        return pd.DataFrame(
            {
                self.id_column: _numpy(batch[self.id_column]),
                "target": target,
                "prediction": pred,
                "target_name": names[target],
                "prediction_name": names[pred],
                "confidence": prob.max(axis=1),
            }
        )

    def compute_metrics(self, pred_df: pd.DataFrame) -> dict[str, float]:
        named = self.class_names if self.num_outputs <= MAX_NAMED_CLASSES else None
        return classification_metrics(
            pred_df["target"].to_numpy(int), pred_df["prediction"].to_numpy(int), self.num_outputs, names=named
        )


class TextClassTask(ImageClassTask):
    """``text_class``: logits over the labels of a text dataset (the user's CSV, a Hugging Face dataset); one row
    per text, named by ``text_id``."""

    id_column = "text_id"

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__(class_names, "text_class")


class PretrainTask(Task):
    """``pretrain_mae``: a masked autoencoder scores itself; its output is each crop's reconstruction loss.

    Targets are unused (the crops are the targets, inside the model); the loss is the mean of the outputs, and
    the one metric is that mean (``val/loss``, ``test/loss``). No classes, no lesions. The run's model is the
    encoder (:meth:`exported`), a torchvision ViT that ``model.weights`` takes back.
    """

    name = kind = "pretrain_mae"
    num_outputs = 1
    main_metric = "loss"
    mode = "min"
    class_names: tuple[str, ...] = ()
    picture_rows = 6

    def __init__(self, picture_every: int = 5) -> None:
        self.picture_every = picture_every

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return torch.zeros(len(batch["image"]))

    def main_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.mean()

    gate_loss = main_loss

    def outputs_to_numpy(self, outputs: torch.Tensor) -> np.ndarray:
        return _numpy(outputs)

    def frame_predictions(self, batch: Mapping[str, Any], outputs_np: np.ndarray) -> pd.DataFrame:
        """One row per crop: its ids, ``target`` 0 and ``prediction`` its reconstruction loss."""
        df = pd.DataFrame({key: _numpy(batch[key]) for key in ID_COLUMNS})
        return df.assign(target=0.0, prediction=np.asarray(outputs_np, dtype=float))

    def compute_metrics(self, pred_df: pd.DataFrame) -> dict[str, float]:
        return {"loss": float(pred_df["prediction"].mean()) if len(pred_df) else float("nan")}

    def confusion(self, pred_df: pd.DataFrame) -> np.ndarray:
        return np.zeros((0, 0), dtype=np.int64)

    def figures(self, model: torch.nn.Module, loader: Any, epoch: int, device: torch.device) -> dict[str, Any]:
        """Every ``picture_every`` epochs: the first validation crops, what the encoder saw, the reconstruction
        (each row rescaled to its crop's range for display)."""
        if epoch % self.picture_every:
            return {}
        images = next(iter(loader))["image"][: self.picture_rows].to(device)
        training = model.training
        model.eval()
        visible, reconstructed = model.pictures(images)
        model.train(training)
        rows = [x.float().cpu().permute(0, 2, 3, 1).numpy() for x in (images, visible, reconstructed)]
        low = rows[0].min(axis=(1, 2, 3), keepdims=True)
        span = rows[0].max(axis=(1, 2, 3), keepdims=True) - low + 1e-6
        images_01, visible_01, reconstructed_01 = ((x - low) / span for x in rows)
        visible_01[rows[1] == 0] = 0.5  # hidden patches grey
        figure = plots.reconstruction_figure(images_01, visible_01, reconstructed_01, f"epoch {epoch}")
        return {f"plots/reconstructions_epoch_{epoch:03d}.png": figure}

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The encoder, its head an identity: the class token's features, in torchvision's layout."""
        vit = copy.deepcopy(model.vit)
        vit.heads = torch.nn.Identity()
        return vit


def get_task(
    name: str,
    main_weights: Sequence[float] = (1.0, 3.0, 5.0),
    gate_weights: Sequence[float] = (1.0, 5.0, 10.0),
    class_names: Sequence[str] = (),
    beta: float = 1.0,
    picture_every: int = 5,
) -> Task:
    """The task called ``name``; the loss weights (size <= 5, 5-10, >= 10 mm) and smooth-L1's ``beta`` apply to
    regression only, ``class_names`` (from the data) to ``image_class`` and ``text_class`` only."""
    if name == "size_regression":
        return RegressionTask(main_weights, gate_weights, beta)
    if name == "size_class3":
        return ClassificationTask(name, CLASS3_NAMES)
    if name == "size_class2":
        return ClassificationTask(name, CLASS2_NAMES)
    if name == "image_class":
        return ImageClassTask(class_names)
    if name == "text_class":
        return TextClassTask(class_names)
    if name == "pretrain_mae":
        return PretrainTask(picture_every)
    raise FsgEndoError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")

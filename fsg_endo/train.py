"""The training loop: one run of one resolved config, readable top to bottom.

Model and optimisers for the regulariser -> epochs of steps (Gradient Routing for ``fsg_gr``) with
periodic gate statistics -> evaluation, best checkpoint, atomic last checkpoint -> test with the
best weights -> predictions, plots and the (gate-folded) model to MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.utils import set_determinism
from tqdm.auto import tqdm

from fsg_endo import plots
from fsg_endo.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fsg_endo.data.prepare import DataBundle
from fsg_endo.gates import fold_gates, gate_parameters, gate_statistics, gate_values, non_gate_parameters
from fsg_endo.models import build_model
from fsg_endo.routing import GradientRouter, train_step
from fsg_endo.tasks import Task, get_task
from fsg_endo.tracking import Tracker

BOX_FEATURES = 4  # log box w, log box h (relative to the frame), box centre x, y


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_for(cfg: Mapping[str, Any], task: Task) -> torch.nn.Module:
    """The model of the config's regulariser: FSG for ``fsg``/``fsg_gr``, dropout only for ``dropout``."""
    m, reg = cfg["model"], cfg["regularizer"]
    extra = {k: m[k] for k in ("dropout", "attention_dropout", "stochastic_depth")} if reg == "dropout" else {}
    return build_model(m["preset"], cfg["data"]["image_size"], m["patch_size"], task.num_outputs,
                       hidden_dim=m["hidden_dim"], depth=m["depth"], heads=m["heads"], mlp_dim=m["mlp_dim"],
                       fsg=cfg["fsg"]["enabled"], box_features=BOX_FEATURES if m["box_features"] else 0,
                       weights=m["weights"], **extra)


def build_optimizers(cfg: Mapping[str, Any], model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    """GR: two optimisers over disjoint sets. Joint FSG: one optimiser, gates in their own group."""
    o, gr = cfg["optim"], cfg["gr"]
    if cfg["gr"]["enabled"]:
        return {"main": torch.optim.Adam(non_gate_parameters(model), lr=o["lr"], weight_decay=o["weight_decay"]),
                "gate": torch.optim.Adam(gate_parameters(model), lr=gr["gate_lr"])}
    groups = [{"params": non_gate_parameters(model)}]
    if cfg["fsg"]["enabled"]:
        groups.append({"params": gate_parameters(model), "lr": gr["gate_lr"], "weight_decay": 0.0})
    return {"main": torch.optim.Adam(groups, lr=o["lr"], weight_decay=o["weight_decay"])}


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_inputs(batch: Mapping[str, Any], device: torch.device, use_box: bool):
    image = batch["image"].to(device, non_blocking=True)
    return (image, batch["box"].to(device, non_blocking=True)) if use_box else image


@torch.no_grad()
def predict(model: torch.nn.Module, loader, task: Task, device: torch.device, use_box: bool, desc: str) -> pd.DataFrame:
    """Frame-level predictions of ``model`` over ``loader`` (ids, target, prediction)."""
    model.eval()
    frames = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        inputs = model_inputs(batch, device, use_box)
        outputs = model(*inputs) if use_box else model(inputs)
        frames.append(task.frame_predictions(batch, task.outputs_to_numpy(outputs.float().cpu())))
    return pd.concat(frames, ignore_index=True)


def evaluate(model, loader, task: Task, device, use_box: bool, split: str) -> tuple[dict[str, float], pd.DataFrame]:
    """``{split}/*`` (per frame) and ``lesion/{split}/*`` (per lesion) metrics, and the frame predictions."""
    frames = predict(model, loader, task, device, use_box, desc=split)
    metrics = {f"{split}/{k}": v for k, v in task.compute_metrics(frames).items()}
    metrics.update({f"lesion/{split}/{k}": v for k, v in task.compute_metrics(task.lesion_predictions(frames)).items()})
    return metrics, frames


def metric_mode(metric: str) -> str:
    """Errors and losses are minimised, everything else (accuracy, F1, AUROC) maximised."""
    return "min" if any(s in metric.rsplit("/", 1)[-1] for s in ("mae", "rmse", "loss")) else "max"


def is_better(value: float, best: float | None, mode: str) -> bool:
    if not np.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def fit(cfg: Mapping[str, Any], data: DataBundle, tracker: Tracker, run_dir: Path) -> dict[str, float]:
    """Train, select the best epoch on validation, test it, log everything; returns the final metrics."""
    set_determinism(seed=cfg["seed"])
    device = select_device(cfg["device"])
    amp = cfg["optim"]["amp"] and device.type == "cuda"
    task = get_task(cfg["task"], cfg["loss"]["main_weights"], cfg["loss"]["gate_weights"])
    use_box, gated = cfg["model"]["box_features"], cfg["fsg"]["enabled"]
    metric = f"val/{task.main_metric}" if cfg["eval"]["metric"] == "auto" else cfg["eval"]["metric"]
    mode = metric_mode(metric)

    model = build_for(cfg, task).to(device)
    optimizers = build_optimizers(cfg, model)
    epochs, steps_per_epoch = cfg["optim"]["epochs"], len(data.loaders["train"])
    warmup = cfg["optim"]["warmup_epochs"] * steps_per_epoch
    schedulers = {k: warmup_cosine(o, warmup, epochs * steps_per_epoch) for k, o in optimizers.items()}
    clip = cfg["optim"]["clip"]
    if cfg["gr"]["enabled"]:
        step_fn = GradientRouter(model, optimizers["main"], optimizers["gate"], task.main_loss, task.gate_loss,
                                 main_clip=clip, gate_clip=cfg["gr"]["gate_clip"], amp=amp,
                                 accumulate_gate_pass_grads=cfg["gr"]["accumulate_gate_pass_grads"]).step
    else:
        step_fn = partial(train_step, model, optimizers["main"], task.main_loss, clip=clip, amp=amp)

    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "skipped": 0, "history": []}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists():  # resume into the same run
        ckpt = load_checkpoint(last_path, device)
        model.load_state_dict(ckpt["model"])
        for k in optimizers:
            optimizers[k].load_state_dict(ckpt["optimizers"][k])
            schedulers[k].load_state_dict(ckpt["schedulers"][k])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])

    threshold, gate_every = cfg["gates"]["sparsity_threshold"], cfg["gates"]["log_every"]
    log_every = cfg["tracking"]["log_every"]
    for epoch in range(state["epoch"], epochs):
        t_epoch, log_seconds0 = time.perf_counter(), tracker.seconds
        data.sampler.set_epoch(epoch)
        model.train()
        sums = {"train/epoch_loss": 0.0, "train/epoch_gate_loss": 0.0}
        n_steps = 0
        for batch in tqdm(data.loaders["train"], desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True):
            out = step_fn(model_inputs(batch, device, use_box), task.targets(batch).to(device))
            for scheduler in schedulers.values():
                scheduler.step()
            state["step"] += 1
            if out.get("skipped"):
                state["skipped"] += 1
                continue
            n_steps += 1
            sums["train/epoch_loss"] += out["loss"]
            sums["train/epoch_gate_loss"] += out.get("gate_loss", float("nan"))
            if state["step"] % log_every == 0:
                tracker.log_metrics({"train/loss": out["loss"], "train/gate_loss": out.get("gate_loss", float("nan")),
                                     "train/lr": schedulers["main"].get_last_lr()[0]}, state["step"])
            if gated and state["step"] % gate_every == 0:
                tracker.log_metrics(gate_statistics(model, threshold), state["step"])

        row = {"epoch": epoch + 1, **{k: v / max(n_steps, 1) for k, v in sums.items()},
               "train/skipped_steps": state["skipped"]}
        if gated:
            if state["step"] % gate_every:  # not already logged at this step
                row.update(gate_statistics(model, threshold))
            tracker.log_gate_epoch(gate_values(model), epoch + 1, plot=cfg["tracking"]["plots"])
        if (epoch + 1) % cfg["eval"]["every"] == 0 or epoch + 1 == epochs:
            val_metrics, _ = evaluate(model, data.loaders["val"], task, device, use_box, "val")
            row.update(val_metrics)
            if is_better(val_metrics.get(metric, float("nan")), state["best"], mode):
                state["best"], state["best_epoch"] = val_metrics[metric], epoch + 1
                save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch + 1})
        state["epoch"] = epoch + 1
        epoch_seconds = time.perf_counter() - t_epoch
        row["perf/epoch_seconds"] = epoch_seconds
        row["perf/logging_share"] = (tracker.seconds - log_seconds0) / epoch_seconds
        state["history"].append({k: float(v) for k, v in row.items()})
        if state["epoch"] % cfg["checkpoint"]["every"] == 0 or state["epoch"] == epochs:
            save_checkpoint(last_path, {"model": model.state_dict(), "state": state, "rng": rng_state(),
                                        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                                        "schedulers": {k: s.state_dict() for k, s in schedulers.items()}})
        tracker.log_metrics(row, state["step"])

    return finish(cfg, data, tracker, model, task, device, use_box, state, best_path, metric)


def finish(cfg, data: DataBundle, tracker: Tracker, model, task: Task, device, use_box: bool,
           state: dict, best_path: Path, metric: str) -> dict[str, float]:
    """Test the best checkpoint on val and test; log predictions, plots and the model."""
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path, device)["model"])
    results: dict[str, float] = {"best_epoch": state["best_epoch"]}
    for split in ("val", "test"):
        metrics, frames = evaluate(model, data.loaders[split], task, device, use_box, split)
        results.update(metrics)
        tracker.log_text(frames.to_csv(index=False), f"predictions/{split}.csv")
    tracker.log_metrics({k: v for k, v in results.items() if k.startswith(("test/", "lesion/test/"))}
                        | {"best_epoch": state["best_epoch"]}, state["step"])
    if cfg["tracking"]["plots"]:
        tracker.log_figure(plots.confusion_figure(task.confusion(frames), task.class_names, "test, per frame"),
                           "plots/confusion_test.png")
        tracker.log_figure(plots.learning_curves(pd.DataFrame(state["history"]), metric), "plots/learning_curves.png")
    if cfg["tracking"]["log_model"]:
        model = model.cpu().eval()
        tracker.log_model(fold_gates(model) if cfg["fsg"]["enabled"] else model)
    tracker.flush()
    return results

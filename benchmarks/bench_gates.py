"""Cost of FSG and Gradient Routing against a plain ViT, the release's GR step and stock torchvision; CPU.

ViT 64 px / patch 8 / 6 layers / 192 dim / 3 heads / batch 32, one regression output. All cases run
in one process, interleaved (one timing of each case per round). The targets apply to the ratio
of medians; the median of per-round ratios ("paired") and the ratio of minima are printed too, as
they are steadier when other processes share the cores. ``--compile`` adds a torch.compile'd GR step
(Inductor; its warmup compiles for minutes on 2 cores). ``--dropout-parts`` adds the ``dropout`` arm's three
regularisers one at a time, to tell which of them its cost comes from:

    python benchmarks/bench_gates.py [--rounds 30] [--threads 2] [--compile] [--dropout-parts]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from machine import cpu_name
from torch import nn

from fsg_endo.engine.schema import Model
from fsg_endo.nn.gates import fold_gates, gate_parameters, non_gate_parameters
from fsg_endo.nn.models import build_model
from fsg_endo.nn.routing import GradientRouter, train_step

SIZE = {"image_size": 64, "patch_size": 8, "num_outputs": 1, "hidden_dim": 192, "depth": 6, "heads": 3, "mlp_dim": 768}
BATCH = 32
# ratio name -> (case, baseline, target on the ratio of medians or None = reported only)
RATIOS = {
    "ours / release GR step": ("gr_step", "release_gr_step", 0.80),
    "GR step / plain step": ("gr_step", "plain_step", 1.70),
    "fast plain / stock plain step": ("plain_step", "stock_plain_step", 0.95),
    "FSG joint / plain step": ("fsg_joint_step", "plain_step", 1.05),
    "dropout arm / plain step": ("dropout_step", "plain_step", None),
    "folded / stock inference": ("folded_inference", "stock_inference", 1.01),
    "fast plain / stock inference": ("plain_inference", "stock_inference", None),
    "gated / plain inference": ("gated_inference", "plain_inference", None),
    "compiled / eager GR step": ("gr_step_compiled", "gr_step", None),
    "  dropout only / plain step": ("dropout_only_step", "plain_step", None),
    "  attention dropout only / plain step": ("attention_dropout_only_step", "plain_step", None),
    "  stochastic depth only / plain step": ("stochastic_depth_only_step", "plain_step", None),
}
DROPOUT_ARM = {k: Model.model_fields[k].default for k in ("dropout", "attention_dropout", "stochastic_depth")}


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-5, foreach=True)


class ReleaseGRStep:
    """The released trainer's GR step (``runners/trainer.py``), re-implemented without its AMP scaler.

    One ``zero_grad`` of both optimisers per batch, then a gate pass and a main pass that each run a
    forward, a full backward (gradients of every parameter, summed over the two passes), clipping over
    all parameters, a ``nan_to_num`` loop over all gradients, and their optimiser's step.
    """

    def __init__(
        self,
        model: nn.Module,
        main: torch.optim.Optimizer,
        gate: torch.optim.Optimizer,
        main_clip: float = 10.0,
        gate_clip: float = 32.0,
    ) -> None:
        self.model, self.passes = model, ((gate, gate_clip), (main, main_clip))
        self.main, self.gate = main, gate

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.main.zero_grad()
        self.gate.zero_grad()
        for optimizer, clip in self.passes:
            mse(self.model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad = torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
            optimizer.step()


def stock_vit() -> nn.Module:
    """A plain ViT with torchvision's own ``EncoderBlock`` (fold_gates turns fast blocks into stock ones)."""
    return fold_gates(build_model(**SIZE))


def plain_step_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """One plain optimiser step of ``model`` on ``(x, y)``, in train mode with an Adam of its own."""
    model.train()
    optimizer = adam(model.parameters())
    return lambda: train_step(model, optimizer, mse, x, y)


def make_cases(
    x: torch.Tensor, y: torch.Tensor, compile_gr: bool, dropout_parts: bool = False
) -> dict[str, Callable[[], object]]:
    """Each benchmark case as a no-argument callable doing one step or one inference batch."""
    torch.manual_seed(0)
    plain, stock, joint = build_model(**SIZE), stock_vit(), build_model(fsg=True, **SIZE)
    routed, released = build_model(fsg=True, **SIZE).train(), build_model(fsg=True, **SIZE).train()
    plain_eval, stock_eval = build_model(**SIZE).eval(), stock_vit().eval()
    gated_eval = build_model(fsg=True, **SIZE).eval()
    folded_eval = fold_gates(gated_eval).eval()

    router = GradientRouter(routed, adam(non_gate_parameters(routed)), adam(gate_parameters(routed)), mse)
    release = ReleaseGRStep(released, adam(non_gate_parameters(released)), adam(gate_parameters(released)))

    def infer(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model(x)

        return run

    cases = {
        "plain_step": plain_step_of(plain, x, y),
        "stock_plain_step": plain_step_of(stock, x, y),
        "gr_step": lambda: router.step(x, y),
        "release_gr_step": lambda: release(x, y),
        "fsg_joint_step": plain_step_of(joint, x, y),
        "dropout_step": plain_step_of(build_model(**DROPOUT_ARM, **SIZE), x, y),
        "plain_inference": infer(plain_eval),
        "stock_inference": infer(stock_eval),
        "folded_inference": infer(folded_eval),
        "gated_inference": infer(gated_eval),
    }
    if dropout_parts:
        for name, rate in DROPOUT_ARM.items():
            cases[f"{name}_only_step"] = plain_step_of(build_model(**{name: rate}, **SIZE), x, y)
    if compile_gr:
        model = build_model(fsg=True, **SIZE).train()
        compiled = GradientRouter(
            torch.compile(model), adam(non_gate_parameters(model)), adam(gate_parameters(model)), mse
        )
        cases["gr_step_compiled"] = lambda: compiled.step(x, y)
    return cases


def measure(cases: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings: every round times each case once, so drifts hit all cases alike."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd GR step (Inductor)")
    parser.add_argument("--dropout-parts", action="store_true", help="add the dropout arm's regularisers one by one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 3, 64, 64, generator=gen), torch.randn(BATCH, 1, generator=gen)
    cases = make_cases(x, y, args.compile, args.dropout_parts)
    load_before = os.getloadavg()[0]
    times = measure(cases, args.rounds, args.warmup)
    load_after = os.getloadavg()[0]
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}

    print(
        f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}, {args.rounds} interleaved rounds, "
        f"load average {load_before:.1f} -> {load_after:.1f}"
    )
    print(f"{'case':<18} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, t in times.items():
        print(f"{name:<18} {median[name] * 1e3:>10.1f} {best[name] * 1e3:>8.1f} {max(t) * 1e3:>8.1f}")
    print(f"\n{'ratio':<38} {'medians':>8} {'paired':>8} {'minima':>8}  target (on medians)")
    for label, (name, baseline, target) in RATIOS.items():
        if name not in times:
            continue
        ratio = median[name] / median[baseline]
        paired = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        verdict = "reported" if target is None else f"<= {target:.2f} " + ("ok" if ratio <= target else "MISSED")
        floor = best[name] / best[baseline]
        print(f"{label:<38} {ratio:7.3f}x {paired:7.3f}x {floor:7.3f}x  {verdict}")


if __name__ == "__main__":
    main()

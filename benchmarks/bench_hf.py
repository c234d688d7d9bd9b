"""Cost of FSG and Gradient Routing on a tiny Hugging Face BERT (sequence classification); CPU.

BERT random init, hidden 32 / 2 layers / 2 heads / FFN 64 / vocab 1000, batch 32 x 64 tokens, 3 classes,
Adam. Cases, interleaved by ``bench_gates.measure`` (one timing of each per round): a plain step of the
stock model, a GR step (``GradientRouter``) and a joint FSG step (one optimiser over everything) of the
gated model. Needs the ``nlp`` extra (transformers):

    python benchmarks/bench_hf.py [--rounds 60] [--warmup 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from bench_gates import adam, measure
from machine import cpu_name
from transformers import BertConfig, BertForSequenceClassification

from fsg_endo.nn.gates import gate_parameters, inject_fsg, non_gate_parameters
from fsg_endo.nn.routing import GradientRouter, train_step

CONFIG = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BATCH, TOKENS, CLASSES = 32, 64, 3
RATIOS = {"GR step / plain step": ("gr_step", "plain_step"), "FSG joint / plain step": ("fsg_joint_step", "plain_step")}


def cross_entropy(out, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, labels)


def make_cases() -> dict[str, object]:
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=CLASSES)).train()
    gated, joint = inject_fsg(copy.deepcopy(plain)), inject_fsg(copy.deepcopy(plain))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, TOKENS), generator=gen)
    inputs = (ids, torch.ones_like(ids))  # BERT's (input_ids, attention_mask)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    plain_opt, joint_opt = adam(plain.parameters()), adam(joint.parameters())
    router = GradientRouter(gated, adam(non_gate_parameters(gated)), adam(gate_parameters(gated)), cross_entropy)
    return {
        "plain_step": lambda: train_step(plain, plain_opt, cross_entropy, inputs, labels),
        "gr_step": lambda: router.step(inputs, labels),
        "fsg_joint_step": lambda: train_step(joint, joint_opt, cross_entropy, inputs, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = measure(make_cases(), args.rounds, args.warmup)
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'case':<16} {'median ms':>10} {'min ms':>8}")
    for name, t in times.items():
        print(f"{name:<16} {median[name] * 1e3:>10.2f} {min(t) * 1e3:>8.2f}")
    print(f"\n{'ratio':<24} {'medians':>8} {'paired':>8} {'minima':>8}")
    for label, (name, baseline) in RATIOS.items():
        paired = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        minima = min(times[name]) / min(times[baseline])
        print(f"{label:<24} {median[name] / median[baseline]:>8.3f} {paired:>8.3f} {minima:>8.3f}")


if __name__ == "__main__":
    main()

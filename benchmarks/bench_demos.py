"""The MNIST demo (scikit-learn digits fallback) trained by this tree against a baseline tree, interleaved.

The baseline is another checkout of fsg_endo, e.g. the commit before the demos moved onto the engine
(``git archive f1e87d6 | tar -x -C /tmp/baseline``). Each round runs ``demo_training_mnist.py`` of both trees
in fresh processes (imports, MLflow store and run included), in alternating order; the script prints the
median wall time of each tree, their ratio, and the held-out accuracy each run printed. Run:
``python benchmarks/bench_demos.py --baseline /tmp/baseline [--rounds 2] [--epochs 20]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"(?:held-out accuracy:? |^accuracy +\S+ +)([0-9.]+)", re.MULTILINE)


def train_once(tree: Path, epochs: int, threads: int) -> tuple[float, float]:
    """Seconds and printed held-out (test) accuracy of one demo_training_mnist.py run of ``tree``."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        cmd = [
            sys.executable,
            str(tree / "experiments" / "demos" / "demo_training_mnist.py"),
            "--data-root",
            "none",
            "--epochs",
            str(epochs),
            "--threads",
            str(threads),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    found = ACCURACY.findall(proc.stdout)
    return seconds, float(found[-1]) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="root of the baseline fsg_endo tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for k in range(args.rounds):
        for name in list(trees) if k % 2 == 0 else list(trees)[::-1]:
            results[name].append(train_once(trees[name], args.epochs, args.threads))
            print(
                f"round {k + 1} {name}: {results[name][-1][0]:.1f} s, accuracy {results[name][-1][1]:.4f}", flush=True
            )
    os_load = os.getloadavg()[0]
    print(
        f"\n{cpu_name()}, {os.cpu_count()} cores, load average now {os_load:.1f}; {args.epochs} epochs, "
        f"{args.threads} thread(s), {args.rounds} rounds"
    )
    medians = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        print(f"{name:>10}: median {medians[name]:.1f} s; accuracies {[round(a, 4) for _, a in runs]}")
    print(f"this tree / baseline: {medians['this tree'] / medians['baseline']:.2f}x the wall time")


if __name__ == "__main__":
    main()

"""``fsg-endo run`` that pauses at a chosen point and writes a marker file, for tests that SIGKILL it there.

    python tests/paused_run.py MARKER step:N|publish:N RUN_ARGS...

``step:N``: right after the N-th optimiser step (mid-epoch, nothing of it checkpointed). ``publish:N``: right
after the N-th checkpoint's metrics reached MLflow, before its gate artifacts (the checkpoint is on disk).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fsg_endo.engine.train as train
from fsg_endo import cli


def pause(marker: Path) -> None:
    marker.write_text("paused")
    time.sleep(600)


def pause_after_step(n: int, marker: Path) -> None:
    build = train.build_recipe

    def build_pausing(*args, **kwargs):
        recipe = build(*args, **kwargs)
        inner, steps = recipe.step, [0]

        def step(*a, **k):
            out = inner(*a, **k)
            steps[0] += 1
            if steps[0] == n:
                pause(marker)
            return out

        recipe.step = step
        return recipe

    train.build_recipe = build_pausing


def pause_after_publish(n: int, marker: Path) -> None:
    publish, calls = train.publish, [0]

    def publish_pausing(tracker, progress, cfg):
        calls[0] += 1
        if calls[0] == n:
            tracker.log_records(progress.metrics)
            tracker.flush()
            pause(marker)
        publish(tracker, progress, cfg)

    train.publish = publish_pausing


if __name__ == "__main__":
    marker, where, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    kind, n = where.split(":")
    (pause_after_step if kind == "step" else pause_after_publish)(int(n), marker)
    sys.exit(cli.main(["run", *args]))

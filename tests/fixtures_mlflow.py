"""A hand-built MLflow store: runs with chosen tags, params, metrics and artifacts, and the plan they follow.

Tests compute what analysis and compare should return from :data:`SWEEP` and :data:`GATE_RUNS`
directly, never from the code under test.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

METRIC = "lesion/test/mae"
T0 = 1_700_000_000_000  # start times (ms) are T0 + offsets, so "latest" is known

# sweep children of the latest parent: (regularizer, fraction, fold, seed, status, METRIC value, start offset)
SWEEP = [
    ("none", 0.5, 0, 0, "FINISHED", 6.0, 10),
    ("none", 0.5, 0, 1, "FINISHED", 7.0, 11),
    ("none", 1.0, 0, 0, "FINISHED", 5.0, 12),
    ("none", 1.0, 0, 1, "FINISHED", 5.5, 13),
    ("fsg", 0.5, 0, 0, "FINISHED", 5.5, 14),
    ("fsg", 0.5, 0, 1, "FINISHED", 6.5, 15),
    ("fsg", 1.0, 0, 0, "FINISHED", 4.0, 16),
    ("fsg", 1.0, 0, 1, "FINISHED", 4.75, 17),
    ("fsg_gr", 0.5, 0, 0, "FINISHED", 4.5, 18),
    ("fsg_gr", 0.5, 0, 1, "FINISHED", 6.75, 19),
    ("fsg_gr", 1.0, 0, 0, "FINISHED", 4.25, 20),
    ("fsg_gr", 1.0, 0, 1, "FINISHED", 4.0, 21),
    ("dropout", 0.5, 0, 0, "FAILED", None, 22),
    ("none", 0.5, 0, 0, "FINISHED", 9.0, 5),  # the same cell run earlier: superseded by the run at offset 10
]
# a child of an older sweep parent: part of the experiment, not of the latest sweep
OLD_CHILD = ("fsg_gr", 0.25, 0, 0, "FINISHED", 8.0, 2)

# top-level runs of the gate experiment: (regularizer, start offset); gates logged for the gated ones
GATE_RUNS = [("fsg_gr", 1), ("fsg", 2), ("fsg_gr", 3), ("none", 4)]
GATE_THRESHOLD = 0.1
# gate snapshots of every gated run: epoch -> key -> values
GATES = {
    1: {
        "attn_00": np.array([0.05, 0.5, 0.9, 0.5]),
        "attn_01": np.array([0.5, 0.5, 0.5, 0.5]),
        "mlp_00": np.array([0.02, 0.08, 0.6, 0.7]),
        "mlp_01": np.array([0.2, 0.3, 0.4, 0.099]),
    },
    2: {
        "attn_00": np.array([0.01, 0.02, 0.95, 0.5]),
        "attn_01": np.array([0.09, 0.5, 0.5, 0.5]),
        "mlp_00": np.array([0.0, 0.05, 0.07, 0.7]),
        "mlp_01": np.array([0.1, 0.3, 0.4, 0.5]),
    },
}
GATE_MEAN_HISTORY = {"gates/attn/layer_00/mean": [(2, 0.49), (4, 0.47)], "gates/mlp/layer_01/mean": [(2, 0.5)]}

# frame predictions of the first fsg_gr sweep child (size regression; mm)
PREDICTIONS = pd.DataFrame(
    {
        "lesion_id": ["a", "a", "b", "c", "c", "c"],
        "video_id": ["v1", "v1", "v1", "v2", "v2", "v2"],
        "frame_id": ["a1", "a2", "b1", "c1", "c2", "c3"],
        "target": [3.0, 3.0, 8.0, 12.0, 12.0, 12.0],
        "prediction": [4.0, 6.0, 7.5, 9.0, 10.0, 14.0],
        "size_mm": [3.0, 3.0, 8.0, 12.0, 12.0, 12.0],
    }
)


def _run(
    client,
    exp_id: str,
    regularizer: str,
    start: int,
    *,
    task: str = "size_regression",
    params: dict | None = None,
    metrics: dict | None = None,
    status: str = "FINISHED",
    parent: str | None = None,
) -> str:
    tags = {"regularizer": regularizer, "task": task} | ({MLFLOW_PARENT_RUN_ID: parent} if parent else {})
    run_id = client.create_run(exp_id, start_time=T0 + start, tags=tags).info.run_id
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        metrics=[Metric(k, v, T0 + start, 0) for k, v in (metrics or {}).items()],
    )
    client.set_terminated(run_id, status, end_time=T0 + start + 1)
    return run_id


def _cell_params(fraction: float, fold: int, seed: int) -> dict:
    return {
        "data.train_fraction": fraction,
        "data.test_fold": fold,
        "seed": seed,
        "gates.sparsity_threshold": GATE_THRESHOLD,
    }


def _log_bytes(client, run_id: str, data: bytes, artifact_file: str, tmp: Path) -> None:
    path = tmp / Path(artifact_file).name
    path.write_bytes(data)
    client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))


def build_hand_store(folder: Path) -> dict:
    """Experiments in ``folder/mlflow.db``: ``hand_sweep`` (two sweeps), ``hand_gates`` (single runs with gates),
    ``hand_plain`` (two ungated runs of different tasks) and ``hand_empty`` (no runs)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    tmp = folder / "staging"
    tmp.mkdir()
    sweep_id = client.create_experiment("hand_sweep", artifact_location=str(folder / "artifacts" / "sweep"))
    old_parent = _run(client, sweep_id, "sweep", 0)
    reg, frac, fold, seed, status, value, start = OLD_CHILD
    _run(
        client,
        sweep_id,
        reg,
        start,
        params=_cell_params(frac, fold, seed),
        metrics={METRIC: value},
        status=status,
        parent=old_parent,
    )
    parent = _run(client, sweep_id, "sweep", 9)
    children = []
    for reg, frac, fold, seed, status, value, start in SWEEP:
        children.append(
            _run(
                client,
                sweep_id,
                reg,
                start,
                params=_cell_params(frac, fold, seed),
                metrics={} if value is None else {METRIC: value},
                status=status,
                parent=parent,
            )
        )
    predictions_run = children[[row[0] for row in SWEEP].index("fsg_gr")]
    _log_bytes(client, predictions_run, PREDICTIONS.to_csv(index=False).encode(), "predictions/test.csv", tmp)

    gates_id = client.create_experiment("hand_gates", artifact_location=str(folder / "artifacts" / "gates"))
    gate_runs = []
    for reg, start in GATE_RUNS:
        run_id = _run(client, gates_id, reg, start, params=_cell_params(1.0, 0, 0))
        if reg != "none":
            for epoch, values in GATES.items():
                buf = io.BytesIO()
                np.savez_compressed(buf, **values)
                _log_bytes(client, run_id, buf.getvalue(), f"gates/epoch_{epoch:03d}.npz", tmp)
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, T0, step) for k, points in GATE_MEAN_HISTORY.items() for step, v in points],
            )
        gate_runs.append(run_id)
    plain_id = client.create_experiment("hand_plain", artifact_location=str(folder / "artifacts" / "plain"))
    _run(client, plain_id, "none", 0, params=_cell_params(1.0, 0, 0), metrics={METRIC: 1.0})
    _run(
        client,
        plain_id,
        "none",
        1,
        task="size_class3",
        params=_cell_params(0.5, 0, 0),
        metrics={"lesion/test/balanced_accuracy": 0.5},
    )
    client.create_experiment("hand_empty", artifact_location=str(folder / "artifacts" / "empty"))
    return {
        "uri": uri,
        "sweep_parent": parent,
        "old_parent": old_parent,
        "sweep_children": children,
        "predictions_run": predictions_run,
        "gate_runs": gate_runs,
    }

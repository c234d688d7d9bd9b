"""Multi-process training with gloo on CPU: Gradient Routing under DDP equals one process on the global batch,
and ``torchrun --nproc_per_node 2 experiments/run.py`` reproduces a single-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO
from fixtures_runs import histories, in_process, only_run

from fsg_endo.engine.distributed import DistContext, init_distributed
from fsg_endo.nn.gates import gate_parameters, non_gate_parameters
from fsg_endo.nn.models import build_model
from fsg_endo.nn.routing import GradientRouter

WORLD, STEPS, BATCH = 2, 4, 8


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("micro", 16, 8, 1, hidden_dim=16, depth=2, heads=2, mlp_dim=32, fsg=True, box_features=0)


def global_batches(nan_step: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed global batches; ``nan_step``: that batch gets a NaN pixel in its second sample (a rank-1 sample)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 16, 16, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS)]
    if nan_step is not None:
        batches[nan_step][0][1, 0, 0, 0] = float("nan")
    return batches


def train_gr(
    model: torch.nn.Module, trained: torch.nn.Module, rank: int, world: int, accumulate: bool, nan_step: int | None
) -> dict:
    """GR steps over this rank's share (every ``world``-th sample) of the global batches.

    SGD, not Adam: Adam turns the float noise of a zero gradient (the attention key bias has one) into
    full-size steps, which would compare rounding, not the all-reduce.
    """
    router = GradientRouter(
        trained,
        torch.optim.SGD(non_gate_parameters(model), lr=0.1, momentum=0.9),
        torch.optim.SGD(gate_parameters(model), lr=1.0),
        torch.nn.functional.mse_loss,
        accumulate_gate_pass_grads=accumulate,
    )
    skipped = [router.step(x[rank::world], y[rank::world])["skipped"] for x, y in global_batches(nan_step)]
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": skipped}


SCENARIOS = [(False, None), (True, None), (False, 1)]  # (accumulate_gate_pass_grads, step with a NaN)


def ddp_worker(rank: int, init_file: str, out: str) -> None:
    """Every scenario in one process group (spawning processes is the slow part)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for i, (accumulate, nan_step) in enumerate(SCENARIOS):
        model = tiny_model()
        trained = DistContext(rank=rank, world_size=WORLD).wrap(
            model, torch.device("cpu"), ignore=gate_parameters(model)
        )
        torch.save(train_gr(model, trained, rank, WORLD, accumulate, nan_step), f"{out}/scenario{i}_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(str(out / "init"), str(out)), nprocs=WORLD)
    return out


@pytest.mark.parametrize("scenario", range(len(SCENARIOS)))
def test_gradient_routing_under_ddp_equals_one_process(ddp_results, scenario):
    accumulate, nan_step = SCENARIOS[scenario]
    model = tiny_model()
    reference = train_gr(model, model, 0, 1, accumulate, nan_step)
    ranks = [torch.load(ddp_results / f"scenario{scenario}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected_skips = [step == nan_step for step in range(STEPS)]
    assert reference["skipped"] == expected_skips
    for result in ranks:
        assert result["skipped"] == expected_skips  # both ranks skipped the step only one of them saw the NaN in
        for got, want in zip(result["params"], reference["params"]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(reference["params"], tiny_model().parameters())]
    assert all(moved)  # gates and backbone both trained: the comparison is not vacuous


def test_single_process_context_is_inert():
    ctx = init_distributed("cpu", env={})
    model = torch.nn.Linear(2, 2)
    assert not ctx.enabled and ctx.is_main and ctx.wrap(model, torch.device("cpu")) is model
    assert ctx.all_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert ctx.broadcast({"a": 1}) == {"a": 1} and ctx.main_first(lambda: 7) == 7


# same global batch (8 = 2 x 4), equal loss weights so the mean of the two ranks' batch means is the global mean
RUN_ARGS = [
    "--exp",
    "polyp_size_fsg",
    "--smoke",
    "--set",
    "tracking.log_model=false",
    "--set",
    "tracking.plots=false",
    "--set",
    "loss.main_weights=[1, 1, 1]",
    "--set",
    "loss.gate_weights=[1, 1, 1]",
]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_match_one(tmp_path, data_cache):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    single_uri, multi_uri = f"sqlite:///{single / 'mlflow.db'}", f"sqlite:///{multi / 'mlflow.db'}"
    assert in_process(RUN_ARGS, single, data_cache, single_uri) == 0  # also fills the data cache first
    env = {**os.environ, "FSG_ENDO_CACHE": str(data_cache), "MLFLOW_TRACKING_URI": multi_uri}
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", str(WORLD), str(REPO / "experiments" / "run.py"), *RUN_ARGS],
        cwd=multi,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MLflow UI") == 1  # rank 0 alone reports

    client, run = only_run(multi_uri)  # rank 0 alone logs: one run
    assert run.info.status == "FINISHED"
    assert len(list(multi.glob("runs/*/last.pt"))) == 1
    got, want = histories(client, run), histories(*only_run(single_uri))
    assert set(got) == set(want)
    for key in (
        "train/loss",
        "train/gate_loss",
        "train/epoch_loss",
        "val/mae",
        "test/mae",
        "lesion/test/mae",
        "gates/all/mean",
        "gates/mlp/layer_01/std",
    ):
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-4, abs=1e-6), key


def test_batch_size_must_split_across_processes(tmp_path, data_cache, capsys):
    from fsg_endo.engine.prepare import prepare_data
    from fsg_endo.errors import FsgEndoError
    from fsg_endo.experiment.config import load_config

    cfg = load_config("polyp_size_fsg", ["optim.batch_size=7"], smoke=True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSG_ENDO_CACHE", str(data_cache))
        with pytest.raises(FsgEndoError, match="optim.batch_size = 7 is not divisible by the 2"):
            prepare_data(cfg, num_replicas=2, rank=1)


def test_ranks_share_an_epoch_without_overlap(tmp_path, data_cache):
    """The two ranks' loaders together hold the single-process epoch, each global batch split between them."""
    from fsg_endo.engine.prepare import prepare_data
    from fsg_endo.experiment.config import load_config

    cfg = load_config("polyp_size_fsg", ["data.augment=false"], smoke=True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSG_ENDO_CACHE", str(data_cache))
        whole = prepare_data(cfg)
        parts = [prepare_data(cfg, num_replicas=WORLD, rank=r) for r in range(WORLD)]
    for bundle in (whole, *parts):
        bundle.set_epoch(1)
    ids = [[b["frame_id"] for b in bundle.loaders["train"]] for bundle in (whole, *parts)]
    assert len(ids[0]) == len(ids[1]) == len(ids[2])
    for k, batch in enumerate(ids[0]):
        assert sorted(batch) == sorted(ids[1][k] + ids[2][k])  # global batch k = the ranks' batch k together
    assert set(parts[1].loaders) == {"train"} and {"val", "test"} <= set(parts[0].loaders)

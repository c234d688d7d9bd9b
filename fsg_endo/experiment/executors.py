"""Sweep executors: run a list of child configs, each through :func:`~fsg_endo.experiment.runs.execute`.

``sequential`` trains the children one after another in this process (also under torchrun). ``ray`` runs
them as Ray tasks, at most ``sweep.max_concurrent`` at once, on a local Ray instance or the cluster of
``--ray-address``/``RAY_ADDRESS``. The driver creates each child's MLflow run before its task starts, so a
task whose worker died is re-run (``sweep.max_retries``) into the same run, from the run's checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fsg_endo.engine.distributed import SINGLE, DistContext
from fsg_endo.engine.interrupt import HANDLED, RunInterrupted, StopSignals
from fsg_endo.engine.schema import Config, Sweep
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.runs import execute, open_run, run_dir_for, start_run
from fsg_endo.tracking.store import TrackingError, retry_store
from fsg_endo.tracking.tracker import Tracker

SWEEP_KEY_TAG = "sweep_key"
LOG_ARTIFACT = "logs/train.log"
CANCEL_WAIT_S = 120.0  # how long a stopped driver waits for its children to checkpoint


@dataclass(frozen=True)
class Child:
    """One child of a sweep: its key, its config, and its run and checkpoint folder once it has them."""

    key: str
    cfg: Config
    run_id: str | None = None
    run_dir: Path | None = None


@dataclass
class Outcome:
    """How a child ended: FINISHED (with its results), FAILED (with the error) or KILLED."""

    key: str
    run_id: str
    status: str
    results: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def open_child(child: Child, uri: str, parent_run_id: str) -> Tracker:
    """The child's run: reopened when it has one (a resumed sweep), else created under the parent."""
    if child.run_id:
        return Tracker.start(uri, child.cfg.name, resume_run_id=child.run_id)
    return start_run(child.cfg, uri, parent_run_id=parent_run_id, extra_tags={SWEEP_KEY_TAG: child.key})


class SequentialExecutor:
    """Every child in this process, one after another (every rank of a torchrun job takes part)."""

    def __init__(self, uri: str, ctx: DistContext = SINGLE) -> None:
        self.uri, self.ctx = uri, ctx

    def run(self, children: list[Child], parent_run_id: str, stop: StopSignals) -> Iterator[Outcome]:
        for child in children:
            tracker = open_run(self.ctx, lambda child=child: open_child(child, self.uri, parent_run_id))
            run_dir = child.run_dir or run_dir_for(child.cfg, tracker.run_id)
            try:
                results = execute(child.cfg, tracker, run_dir, self.ctx, stop)
                yield Outcome(child.key, tracker.run_id, "FINISHED", results)
            except (KeyboardInterrupt, TrackingError):
                raise
            except Exception as err:
                print(f"sweep: child {child.key} failed: {err}", file=sys.stderr)
                yield Outcome(child.key, tracker.run_id, "FAILED", error=str(err))

    def close(self) -> None:
        pass


def is_local_store(uri: str) -> bool:
    """Whether the tracking store is a file on this machine (SQLite, a file store), which other nodes cannot share."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address``, or start a quiet local instance bound to 127.0.0.1 (no dashboard);
    reuses an instance this process already holds. Returns whether this call started or joined one."""
    if not address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray resolves 127.0.0.1 to the machine's routable address unless it believes it runs no cluster
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_worker_niceness", "0")  # children are the work, not background (Ray's default: 15)
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(
                address="local",
                num_cpus=num_cpus or len(os.sched_getaffinity(0)),
                object_store_memory=100 * 2**20,
                **quiet,
            )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise FsgEndoError(f"Ray cluster {address or 'local'}: cannot connect: {str(err).splitlines()[0]}") from None
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():  # ray.init installs its own; the sweep's stay in charge
            signal.signal(signum, handler)
    return True


class RayExecutor:
    """Children as Ray tasks (``sweep.resources`` each), at most ``max_concurrent`` at once, one progress bar."""

    def __init__(self, sweep: Sweep, uri: str, address: str | None = None) -> None:
        self.uri, self.owns_ray = uri, connect_ray(address)  # first: Ray reads its variables when imported
        import ray

        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len(nodes) > 1 and is_local_store(uri):
            raise FsgEndoError(
                f"tracking store {uri} is a local file, but the Ray cluster {address} has "
                f"{len(nodes)} nodes: start an MLflow server (mlflow server --host HOST) and "
                "pass its URL with --tracking-uri http://HOST:5000"
            )
        self.cpus, self.gpus = sweep.resources.cpus, sweep.resources.gpus
        self.max_retries = sweep.max_retries
        self.max_concurrent = sweep.max_concurrent or default_concurrency(ray.cluster_resources(), self.cpus, self.gpus)
        # passed with each task, not as a runtime_env, which needs workers of its own beside the ones Ray prestarts
        # (bench_sweep measured no difference in wall time; it is the simpler of the two)
        self.env = {k: str(Path(v).resolve()) for k, v in os.environ.items() if k == "FSG_ENDO_CACHE"}
        self.task = ray.remote(run_child_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=False
        )

    def run(self, children: list[Child], parent_run_id: str, stop: StopSignals) -> Iterator[Outcome]:
        import ray

        pending, inflight, failed = list(children), {}, 0
        with stop.deferred(), tqdm(total=len(children), desc="sweep", unit="child", dynamic_ncols=True) as bar:
            while pending or inflight:
                while pending and len(inflight) < self.max_concurrent and stop.requested is None:
                    child = self.submit_ready(pending.pop(0), parent_run_id)
                    inflight[self.task.remote(child, self.uri, self.cpus, os.getcwd(), self.env)] = child
                if bar.postfix != (state := f"running={len(inflight)}, failed={failed}"):
                    bar.set_postfix_str(state)
                if stop.requested is not None:
                    yield from self.cancel(inflight)
                    raise RunInterrupted(
                        stop.requested, f"sweep stopped by a signal; resume with --resume {parent_run_id}"
                    )
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    outcome = self.collect(ref, inflight.pop(ref))
                    failed += outcome.status != "FINISHED"
                    if outcome.error:
                        bar.write(f"sweep: child {outcome.key} failed: {outcome.error}", file=sys.stderr)
                    bar.update()
                    yield outcome

    def submit_ready(self, child: Child, parent_run_id: str) -> Child:
        """The child with its run created (or reopened) and an absolute checkpoint folder, ready for a worker."""
        tracker = open_child(child, self.uri, parent_run_id)
        tracker.close()
        return replace(
            child, run_id=tracker.run_id, run_dir=(child.run_dir or run_dir_for(child.cfg, tracker.run_id)).resolve()
        )

    def collect(self, ref: Any, child: Child) -> Outcome:
        """The task's outcome; a task Ray gave up on (its worker died past the retries) is marked FAILED."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return self.mark(child, "KILLED", None)
        except ray.exceptions.RayTaskError as err:  # the task itself raised (it catches what training raises)
            return self.mark(child, "FAILED", str(err).strip().splitlines()[-1][:200])
        except ray.exceptions.RayError as err:
            reason = str(err).strip().splitlines()[0][:200]
            return self.mark(child, "FAILED", f"worker died ({self.max_retries} retries): {reason}")

    def cancel(self, inflight: dict[Any, Child]) -> Iterator[Outcome]:
        """Ask every running child to stop (each checkpoints and ends KILLED), wait for them, mark the rest."""
        import ray

        for ref in inflight:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: the training loop's stop request
        if inflight:
            ray.wait(list(inflight), num_returns=len(inflight), timeout=CANCEL_WAIT_S)
        for ref, child in inflight.items():
            yield self.collect(ref, child)
        inflight.clear()

    def mark(self, child: Child, status: str, error: str | None) -> Outcome:
        """End a child's run the task could not end itself, attaching its log if the worker wrote one."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.uri)

        def call(fn: Callable[[], Any]) -> Any:
            return retry_store(fn, self.uri, Tracker.max_outage)

        if call(lambda: client.get_run(child.run_id)).info.status in ("RUNNING", "SCHEDULED"):
            call(lambda: client.set_terminated(child.run_id, status))
        log = child.run_dir / "train.log"
        if log.is_file():
            call(lambda: client.log_artifact(child.run_id, str(log), "logs"))
        return Outcome(child.key, child.run_id, status, error=error)

    def close(self) -> None:
        import ray

        if self.owns_ray:
            ray.shutdown()


def default_concurrency(resources: Mapping[str, float], cpus: float, gpus: float) -> int:
    """Children that fit at once: the cluster's CPUs / ``cpus``, capped by its GPUs / ``gpus`` if they use GPUs."""
    n = int(resources.get("CPU", 1) // cpus)
    if gpus > 0:
        if not resources.get("GPU"):
            raise FsgEndoError(f"sweep.resources.gpus = {gpus:g}, but the Ray cluster has no GPU")
        n = min(n, int(resources["GPU"] // gpus))
    return max(1, n)


def run_child_task(child: Child, uri: str, cpus: float, cwd: str, env: Mapping[str, str]) -> Outcome:
    """A Ray task: the child's run reopened and executed with ``cpus`` torch threads, in the driver's folder
    (a shared filesystem on a cluster) and with the driver's ``env`` (the data cache); its output goes to
    ``train.log``, logged as ``logs/train.log``."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    os.environ.update(env)
    log, home = child.run_dir / "train.log", os.getcwd()
    os.chdir(cwd)
    try:
        with output_to(log), StopSignals() as stop:
            node = f"{os.uname().nodename} {ray.util.get_node_ip_address()}"
            print(
                f"--- {child.key}: run {child.run_id} on {node} (pid {os.getpid()}) "
                f"at {time.strftime('%Y-%m-%d %H:%M:%S')}",
                flush=True,
            )
            tracker = None
            try:
                tracker = Tracker.start(uri, child.cfg.name, resume_run_id=child.run_id)
                results = execute(child.cfg, tracker, child.run_dir, SINGLE, stop)
                outcome = Outcome(child.key, child.run_id, "FINISHED", results)
            except KeyboardInterrupt:
                outcome = Outcome(child.key, child.run_id, "KILLED")
            except Exception as err:
                print(f"child failed: {err}", flush=True)
                outcome = Outcome(child.key, child.run_id, "FAILED", error=str(err))
        if tracker is not None:
            with contextlib.suppress(TrackingError):
                tracker.log_file(log, "logs")
    finally:
        os.chdir(home)
    return outcome


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: also C code, tqdm, logging) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def open_executor(
    sweep: Sweep, uri: str, ctx: DistContext = SINGLE, ray_address: str | None = None
) -> SequentialExecutor | RayExecutor:
    """The executor of ``sweep.executor``; Ray is connected (and a local store refused on a cluster) here."""
    if sweep.executor == "sequential":
        return SequentialExecutor(uri, ctx)
    if ctx.world_size > 1:
        raise FsgEndoError("sweep.executor = ray does not run under torchrun: set sweep.executor=sequential")
    return RayExecutor(sweep, uri, ray_address or os.environ.get("RAY_ADDRESS"))

"""Jobs on Ray actors behind the one ZeroMQ front: `python -m backend serve --ray auto|ADDRESS`.

The front (backend.server) keeps the ROUTER socket, the job store, the job ids and the seqs. Each
worker is a Ray actor (`JobActor`): one per GPU of the cluster (`num_gpus=1`), or `--workers N`
on CPUs with `--device cpu`. An actor loads the models once (backend.pipeline.make_runner) and
runs jobs one after another with `backend.jobs.run_job`, the function the in-process worker runs
them with. Its `JobContext` writes to a `RelayStore`, which hands every write (events, progress
with its preview, checkpoints, the result) to a Ray streaming generator; the front's `RayWorker`
replays them, in order, on the job's real context at the front: stored there, seqs given there.

Faults: an actor whose process or node dies breaks the front's stream: `RayWorker.execute`
raises `WorkerLost` and the server resumes the job from its newest stored checkpoint on the next
free worker. Ray restarts the actor (`max_restarts`), which loads its models again and rejoins;
a worker whose models fail to load leaves the pool, named in the log and in `degraded`.

Ray is imported by this module only, and the server imports it only for `--ray`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from backend.jobs import JobCancelled, JobContext, JobHooks, JobInterrupted, Outcome, run_job
from backend.jobs import one_line
from backend.server import ConfigError, WorkerInfo, WorkerLost
from backend.store import Buffers, JobRecord, StoredEvent

log = logging.getLogger("dreamloom.server")

CONNECT_S = 5.0
"""How long `--ray ADDRESS` may take to answer at start."""
LOAD_S = 900.0
"""How long a worker may take to start and load its models (a first download is minutes)."""
RESTART_S = 600.0
"""How long a worker whose process died may take to be back (Ray restarts it, maybe elsewhere)."""
STOP_POLL_S = 0.1
"""How often a running job's cancel and the server's stop are looked at, to pass them on."""
RETRY_S = 0.5
"""Wait between asking a restarting worker again."""
DEFAULT_RAY_PORT = 6379
LOST_ERRORS = RayActorError
"""What Ray raises when a worker's process or node is gone (ActorDiedError and
ActorUnavailableError are kinds of it)."""


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run one job: the front's record, its inputs and checkpoint."""

    job_id: str
    kind: str
    params: dict[str, Any]
    """The validated params as a plain map, validated again on the worker."""
    inputs: Buffers
    resumed: bool
    checkpoint: bytes | None
    """The newest stored checkpoint when the job resumes."""
    has_result: bool
    """The front stored the final GLB already (a job stopped between the GLB and its mesh event)."""
    last_seq: int
    """The seq of the job's newest stored event: the worker's first event gets the next."""


class RelayStore:
    """The store a job's context writes to on a worker: each write goes to `out`, for the front
    to store in this order. Seqs are counted on from the front's `last_seq` (the front, which
    alone writes this job's events while it runs, gives the same)."""

    def __init__(self, spec: JobSpec, out: "queue.SimpleQueue[tuple]") -> None:
        self._out = out
        self._seq = spec.last_seq
        self._checkpoint = spec.checkpoint
        self._has_result = spec.has_result

    def append_event(self, job_id: str, body: dict[str, Any], buffers: Buffers | None = None) -> StoredEvent:
        self._seq += 1
        buffers = dict(buffers or {})
        self._out.put(("event", body, buffers))
        return StoredEvent(job_id, self._seq, body["event"], body, buffers, time.time())

    def save_checkpoint(self, job_id: str, state: bytes) -> None:
        self._checkpoint = bytes(state)
        self._out.put(("checkpoint", self._checkpoint))

    def load_checkpoint(self, job_id: str) -> bytes | None:
        return self._checkpoint

    def save_result(self, job_id: str, glb: bytes) -> None:
        self._has_result = True
        self._out.put(("result", bytes(glb)))

    def has_result(self, job_id: str) -> bool:
        """Whether the front had stored the job's GLB when it started it, or the job sent it since."""
        return self._has_result


class JobActor:
    """One worker on the cluster: loads the models once, then runs jobs one after another."""

    def __init__(self, models: str, device: str, preset: str | None = None) -> None:
        self._models = models
        self._device = device
        self._preset = preset
        self._runner = None
        self._hooks: dict[str, JobHooks] = {}

    def describe(self) -> dict[str, Any]:
        """Where this actor runs: node address, its GPU (None on the CPU), process id."""
        gpus = ray.get_gpu_ids()
        return {"node": ray.util.get_node_ip_address(), "gpu": str(gpus[0]) if gpus else None, "pid": os.getpid()}

    def load(self) -> tuple[str, dict[str, str]]:
        """Load the models (once); (device line, role -> model name) for `welcome`."""
        from backend.pipeline import make_runner

        if self._runner is None:
            self._runner = make_runner(models=self._models, device=self._device, preset=self._preset)
        return self._runner.device, dict(self._runner.models)

    def run(self, spec: JobSpec) -> Iterator[tuple]:
        """Run one job; yields what its context writes, then ("end", state, reason)."""
        from protocol.params import validate_submit

        self.load()
        out: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        hooks = JobHooks(on_event=lambda event: None,  # the RelayStore queued it already
                         on_progress=lambda job_id, body, buffers: out.put(("progress", body, buffers)))
        self._hooks[spec.job_id] = hooks
        ctx = JobContext(job_id=spec.job_id, kind=spec.kind, params=validate_submit(spec.kind, spec.params, spec.inputs),
                         inputs=spec.inputs, resumed=spec.resumed, store=RelayStore(spec, out), hooks=hooks)

        def work() -> None:
            outcome = run_job(self._runner, ctx)
            out.put(("end", outcome.state, outcome.reason))

        threading.Thread(target=work, name=f"job-{spec.job_id}", daemon=True).start()
        try:
            while True:
                item = out.get()
                yield item
                if item[0] == "end":
                    return
        finally:
            self._hooks.pop(spec.job_id, None)

    def stop(self, job_id: str, interrupt: bool) -> None:
        """Cancel the job, or interrupt it (the server stops: it stays running, to resume)."""
        hooks = self._hooks.get(job_id)
        if hooks is not None:
            (hooks.shutdown if interrupt else hooks.cancel).set()


RemoteJobActor = ray.remote(max_concurrency=4)(JobActor)
"""The actor class: `run` streams while `stop` (and `describe`) are answered beside it."""


@dataclass
class RayWorker:
    """The front's handle on one JobActor (a server.JobWorker)."""

    actor: Any
    label: str
    """"worker0", "worker1"...: names a worker on the CPU, and one not started yet."""
    info: WorkerInfo = dataclasses.field(init=False)
    device: str = ""
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    problem: str | None = None
    pid: int = 0
    """The actor's process id, set once it can serve (its models loaded): a restarted worker's new
    pid means it is back in the pool (the tests kill it by this pid)."""

    def __post_init__(self) -> None:
        self.info = WorkerInfo(self.label, "", None)

    def execute(self, ctx: JobContext, record: JobRecord) -> Outcome:
        spec = JobSpec(job_id=ctx.job_id, kind=ctx.kind, params=record.params, inputs=ctx.inputs,
                       resumed=ctx.resumed, checkpoint=ctx.load_checkpoint() if ctx.resumed else None,
                       has_result=ctx.has_result, last_seq=record.last_seq)
        done = threading.Event()
        threading.Thread(target=self._pass_stops, args=(ctx, done), daemon=True).start()
        try:
            for ref in self.actor.run.remote(spec):
                item = ray.get(ref)
                if item[0] == "end":
                    return Outcome(item[1], item[2])
                _replay(ctx, item)
        except LOST_ERRORS as exc:
            raise WorkerLost(one_line(exc)) from exc
        except RayTaskError as exc:  # the worker failed around the job (run_job catches the job's own faults)
            cause = exc.cause or exc
            return Outcome("failed", f"worker {self.info.name} failed: {type(cause).__name__}: {one_line(cause)}")
        except Exception:  # the front failed storing what came (a full disk): stop the job there
            self.actor.stop.remote(ctx.job_id, False)
            raise
        finally:
            done.set()
        raise WorkerLost("the worker's stream ended before the job did")

    def _pass_stops(self, ctx: JobContext, done: threading.Event) -> None:
        """Pass the job's cancel, or the server's stop, on to the actor while the job runs."""
        while not done.wait(STOP_POLL_S):
            try:
                ctx.check_cancelled()
            except JobInterrupted:
                self.actor.stop.remote(ctx.job_id, True)
                return
            except JobCancelled:
                self.actor.stop.remote(ctx.job_id, False)
                return

    def start(self, timeout_s: float = LOAD_S) -> bool:
        """Wait for the actor, learn where it runs, load its models; False (and `problem`) when
        it cannot serve: its models failed to load, or it is gone."""
        deadline = time.monotonic() + timeout_s
        try:
            where = self._describe(deadline)
            self.info = WorkerInfo(_worker_name(where, self.label), where["node"], where["gpu"])
            self.device, self.models = ray.get(self.actor.load.remote(), timeout=max(1.0, deadline - time.monotonic()))
            self.pid = where["pid"]  # set once the worker can serve: a new pid means it is back
            return True
        except RayTaskError as exc:
            self.problem = f"its models failed to load: {one_line(exc.cause or exc)}"
        except LOST_ERRORS as exc:
            self.problem = f"its process is gone: {one_line(exc)}"
        except GetTimeoutError:
            self.problem = f"it did not start and load its models within {timeout_s:.0f} s"
        ray.kill(self.actor, no_restart=True)
        return False

    def _describe(self, deadline: float) -> dict[str, Any]:
        """The actor's `describe`, asked again while Ray says it is restarting."""
        while True:
            try:
                return ray.get(self.actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_S)

    def recover(self) -> bool:
        log.info("worker %s: waiting for Ray to restart it", self.info.name)
        return self.start(RESTART_S)


def _replay(ctx: JobContext, item: tuple) -> None:
    """Do at the front what the worker's context did: store it, send it on."""
    kind = item[0]
    if kind == "event":
        body, buffers = item[1], item[2]
        ctx.emit(body["event"], body, buffers)
    elif kind == "progress":
        body, buffers = item[1], item[2]
        ctx.progress(body["stage"], body["step"], body["steps"], body["eta_s"], body["losses"], buffers.get("preview"))
    elif kind == "checkpoint":
        ctx.save_checkpoint(item[1])
    elif kind == "result":
        ctx.set_result(item[1])
    else:
        raise ValueError(f"a worker sent {kind!r}, which the front does not know")


def _worker_name(where: dict[str, Any], label: str) -> str:
    """"10.0.0.7/gpu1" for a worker on a GPU, "10.0.0.7/worker0" on the CPU."""
    return f"{where['node']}/gpu{where['gpu']}" if where["gpu"] is not None else f"{where['node']}/{label}"


def connect(address: str) -> None:
    """Join the cluster at ADDRESS (host[:port] of its head), or start a local one for "auto"."""
    if address == "auto":
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        return
    host, _, port = address.rpartition(":") if ":" in address else (address, "", str(DEFAULT_RAY_PORT))
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot reach a Ray head there within {CONNECT_S:.0f} s ({exc}); "
                          "start one with `ray start --head` or pass --ray auto") from exc
    ray.init(address=f"{host}:{port}", log_to_driver=False, configure_logging=False)


def plan_workers(resources: dict[str, float], device: str, workers: int | None) -> tuple[int, dict[str, float]]:
    """How many workers to start on a cluster of `resources` (ray.cluster_resources()) and what
    each one asks Ray for: one per GPU with `num_gpus=1`, or `workers` on the CPUs."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cpu":
        count = workers or 1
        if count > cpus:
            raise ConfigError(f"--workers {count}: the Ray cluster has {cpus} CPUs; pass --workers {max(cpus, 1)} or less")
        return count, {"num_cpus": 1, "num_gpus": 0}
    if gpus == 0:
        raise ConfigError(f"the Ray cluster ({_describe(resources)}) has no GPU node; "
                          "add one with `ray start --address HEAD` on a GPU machine, or pass --device cpu")
    if workers is not None:
        raise ConfigError(f"--workers {workers} is for --device cpu: with GPUs, one worker runs per GPU ({gpus})")
    return gpus, {"num_cpus": 0, "num_gpus": 1}


def start_workers(models: str, device: str, workers: int | None, preset: str | None = None) -> list[RayWorker]:
    """Start the workers on the cluster this process joined (`connect`) and load their models;
    the ones that cannot serve are named in the log and left out. ConfigError when there is
    nothing to serve with."""
    count, options = plan_workers(ray.cluster_resources(), device, workers)
    pool = [RayWorker(RemoteJobActor.options(max_restarts=-1, **options).remote(models, device, preset), f"worker{index}")
            for index in range(count)]
    with concurrent.futures.ThreadPoolExecutor(len(pool)) as threads:  # they load their models at once
        started = [worker for worker, ok in zip(pool, threads.map(RayWorker.start, pool)) if ok]
    for worker in pool:
        if worker not in started:
            log.error("worker %s left the pool: %s", worker.info.name, worker.problem)
    if not started:
        raise ConfigError(f"no Ray worker could serve: {pool[0].info.name}: {pool[0].problem}")
    log.info("%d Ray workers serve: %s", len(started), ", ".join(worker.info.name for worker in started))
    return started


def stop_workers(workers: list[RayWorker]) -> None:
    """End the workers (a job still running resumes at the next start)."""
    for worker in workers:
        ray.kill(worker.actor, no_restart=True)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in sorted(resources.items())
                     if not name.startswith(("node:", "memory", "object_store")))

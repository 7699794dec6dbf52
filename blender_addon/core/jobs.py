"""Job state on the client and the `seq` bookkeeping that makes catching up free of duplicates.

Events of a job carry `seq` 1, 2, 3… without gaps (PROTOCOL.md section 2). A client applies them in
order exactly once: repeats (seq at or below the last received one) are dropped, and an event that
arrives ahead of a gap waits until the gap is filled.

Received is not applied: `ApplyQueue` holds each job's received events until the scene has taken
them, so an update that cannot be applied now (the object is in Edit Mode) waits instead of being
lost. Mesh events are prepared on a worker thread as they arrive, and a mesh event followed by a
newer mesh of the same job is superseded (counted as applied without touching the scene), so
catching up on many meshes applies only the newest.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

TERMINAL_STATES = ("done", "failed", "cancelled")
"""States after which a job sends no more events."""


@dataclass
class JobRecord:
    """What the client knows about one job it follows."""

    job_id: str
    """The server's id of the job."""
    kind: str = "generate"
    """"generate" or "refine_texture"."""
    prompt: str = ""
    """The job's prompt, for names and the job list."""
    state: str = "queued"
    """The newest `state` event: queued, running, done, failed or cancelled."""
    stage: str = ""
    """The current stage: coarse, geometry or texture ("" before the first)."""
    step: int = 0
    """The newest progress step within the stage."""
    steps: int = 0
    """The number of steps in the current stage."""
    eta_s: float | None = None
    """Seconds left in the stage by the server's estimate, or None when unknown."""
    error: str = ""
    """The server's message when the job failed."""
    last_seq: int = 0
    """The seq of the last event applied (0: none yet)."""
    preview_png: bytes | None = None
    """The newest preview render (PNG bytes) from a `progress` message."""
    held: dict[int, Any] = field(default_factory=dict)
    """Events that came ahead of a gap, by seq, waiting for the ones before them."""

    @property
    def finished(self) -> bool:
        """True once a terminal state event was applied."""
        return self.state in TERMINAL_STATES

    def accept(self, seq: int, event: Any) -> list[Any]:
        """Take one event; return the events now ready to apply, in seq order.

        Advances `last_seq` over every returned event: the caller applies them in that order.
        """
        if seq <= self.last_seq or seq in self.held:
            return []
        self.held[seq] = event
        ready = []
        while self.last_seq + 1 in self.held:
            self.last_seq += 1
            ready.append(self.held.pop(self.last_seq))
        return ready

    def apply_state(self, body: dict) -> None:
        """Update state, stage and error fields from a `state` or `stage` event body."""
        if body.get("event") == "state":
            self.state = str(body.get("state", self.state))
            if self.state == "failed":
                self.error = str(body.get("error") or "the job failed without a message")
        elif body.get("event") == "stage":
            self.stage = str(body.get("stage", self.stage))
            self.steps = int(body.get("steps") or 0)
            self.step = 0

    def apply_progress(self, body: dict, preview_png: bytes | None) -> None:
        """Update stage, step, steps and time left from a `progress` message."""
        self.stage = str(body.get("stage") or self.stage)
        self.step = int(body.get("step") or 0)
        self.steps = int(body.get("steps") or self.steps)
        eta = body.get("eta_s")
        self.eta_s = None if eta is None else float(eta)
        if preview_png is not None:
            self.preview_png = preview_png


@dataclass
class PendingEvent:
    """A received event waiting to be applied."""

    message: Any
    """The `event` message."""
    prepared: Future | None = None
    """The worker's preparation of a mesh event (its result or its MeshDataError), or None."""
    superseded: bool = False
    """A newer mesh event of the same job came: this one is skipped."""

    @property
    def seq(self) -> int:
        """The event's seq."""
        return int(self.message.seq)

    @property
    def is_mesh(self) -> bool:
        """True for a `mesh` event."""
        return self.message.body.get("event") == "mesh"

    @property
    def ready(self) -> bool:
        """True when nothing is left to prepare."""
        return self.prepared is None or self.prepared.done()


class ApplyQueue:
    """Received events not yet applied, per job in seq order; meshes prepared on one worker thread."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        """The worker, started by the first mesh to prepare (and again after `close`)."""
        self.jobs: dict[str, list[PendingEvent]] = {}

    def push(self, job_id: str, message: Any, prepare: Callable[[dict], Any] | None) -> None:
        """Queue an event; `prepare(buffers)` runs on the worker for a mesh event that needs it.

        Earlier mesh events of the job still waiting are superseded (their preparation is
        cancelled when it has not started).
        """
        queue = self.jobs.setdefault(job_id, [])
        pending = PendingEvent(message)
        if pending.is_mesh:
            for older in queue:
                if older.is_mesh and not older.superseded:
                    older.superseded = True
                    if older.prepared is not None:
                        older.prepared.cancel()
            if prepare is not None:
                pending.prepared = self.run(prepare, message.buffers)
        queue.append(pending)

    def run(self, fn: Callable, *args: Any) -> Future:
        """Run `fn(*args)` on the worker thread (started on first use)."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamloom-mesh")
        return self.executor.submit(fn, *args)

    def head(self, job_id: str) -> PendingEvent | None:
        """The job's next event to apply, or None when there is none or it is still being prepared."""
        queue = self.jobs.get(job_id)
        if not queue:
            return None
        pending = queue[0]
        return pending if pending.superseded or pending.ready else None

    def pop(self, job_id: str) -> PendingEvent:
        """Take the job's next event off the queue (once it is applied or skipped)."""
        queue = self.jobs[job_id]
        pending = queue.pop(0)
        if not queue:
            del self.jobs[job_id]
        return pending

    def drop(self, job_id: str) -> None:
        """Forget a job's waiting events (the job left the scene)."""
        for pending in self.jobs.pop(job_id, []):
            if pending.prepared is not None:
                pending.prepared.cancel()

    def waiting(self, job_id: str) -> int:
        """How many of the job's events wait."""
        return len(self.jobs.get(job_id, ()))

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def clear(self) -> None:
        """Forget every job's waiting events."""
        for job_id in list(self.jobs):
            self.drop(job_id)

    def close(self) -> None:
        """Forget every waiting event and stop the worker (work not started is cancelled)."""
        self.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

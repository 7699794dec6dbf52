"""The interface between the server and the code that does a job's work (a runner).

The server owns the sockets and the store; a runner owns the work. The server calls
`runner.run(ctx)` on its one worker thread, for one job at a time. Through `ctx` the runner:

1. emits `stage`, `mesh` and `note` events (stored, then sent to subscribers; `emit` returns
   the seq); a `note` tells the artist something the job decided for them (a clamped value),
2. reports `progress` (not stored; the newest replaces older ones),
3. calls `check_cancelled()` once per optimisation step (raises `JobCancelled`),
4. saves checkpoints (bytes, newest wins) and, when `ctx.resumed`, loads the newest one,
5. hands over the final GLB with `set_result(glb_bytes)` and emits the final `mesh` event
   (`final: True`) before it returns.

The server emits the `state` events. `run` returning after step 5 ends the job `done`; an
exception ends it `failed` with a one-line reason; `JobCancelled` ends it `cancelled`.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from backend.store import Buffers, JobStore, StoredEvent

if TYPE_CHECKING:
    from protocol.params import GenerateParams, RefineParams

log = logging.getLogger("dreamloom.server")

RUNNER_EVENTS = ("stage", "mesh", "note")
STAGES = ("coarse", "geometry", "texture")
GLB_MAGIC = b"glTF"


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` when the job was cancelled or deleted."""


class JobInterrupted(JobCancelled):
    """Raised by `check_cancelled` when the server shuts down: the job stays `running` in the
    store and resumes from its newest checkpoint at the next start."""


class JobFailed(RuntimeError):
    """The job cannot go on; the message says why in words an artist can act on, and is shown
    as it is (no exception type in front)."""


class RunnerError(Exception):
    """A runner used the context wrongly (the message names the field and value)."""


class JobRunner(Protocol):
    """What the server needs from the code that runs jobs."""

    device: str
    """For `welcome`, e.g. "cpu" or "cuda:0 NVIDIA H100 80GB HBM3"."""
    models: dict[str, str]
    """Role -> model name, for `welcome`."""

    def run(self, ctx: JobContext) -> None:
        """Do the job's work, reporting through `ctx` (see the module docstring)."""
        ...


@dataclass
class JobHooks:
    """How a context reaches the server: callbacks run on the worker thread, thread-safe."""

    on_event: Callable[[StoredEvent], None]
    """Called with each event after it is stored; the server sends it to subscribers."""
    on_progress: Callable[[str, dict[str, Any], Buffers], None]
    """Called with (job_id, progress body, buffers); the server sends the newest one."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set by the server when the job is cancelled or deleted."""
    shutdown: threading.Event = field(default_factory=threading.Event)
    """Set by the server when it is stopping."""


class JobContext:
    """One job as a runner sees it."""

    def __init__(
        self,
        *,
        job_id: str,
        kind: str,
        params: GenerateParams | RefineParams,
        inputs: dict[str, np.ndarray | bytes],
        resumed: bool,
        store: JobStore,
        hooks: JobHooks,
    ) -> None:
        self.job_id = job_id
        """32 lowercase hex characters."""
        self.kind = kind
        """"generate" or "refine_texture"."""
        self.params = params
        """Validated, defaults filled (protocol.params)."""
        self.inputs = inputs
        """The submit's buffers: name -> numpy array or bytes."""
        self.resumed = resumed
        """True when the job was running when the server stopped and now starts again:
        `load_checkpoint()` gives where it was."""
        self.final_mesh_emitted = False
        """Set once a `mesh` event with `final: True` is emitted."""
        self._store = store
        self._hooks = hooks
        self._has_result = store.has_result(job_id)

    @property
    def has_result(self) -> bool:
        """True once `set_result` stored the final GLB."""
        return self._has_result

    def emit(self, event: str, body: dict[str, Any], buffers: Buffers | None = None) -> int:
        """Store a `stage` or `mesh` event, then send it to subscribers; returns its seq.

        `mesh` events need buffers `positions` f4 [N,3] and `faces` i4 [M,3]; `vertex_count`,
        `face_count` and `bbox` are filled from them when the body leaves them out.
        """
        if event not in RUNNER_EVENTS:
            raise RunnerError(f"event must be one of {RUNNER_EVENTS}, got {event!r}")
        body = {**body, "event": event}
        buffers = dict(buffers or {})
        if event == "stage":
            _check_stage_body(body)
        elif event == "note":
            _check_note_body(body)
        else:
            _complete_mesh_body(body, buffers)
        stored = self._store.append_event(self.job_id, body, buffers)
        if event == "mesh" and body["final"]:
            self.final_mesh_emitted = True
        self._hooks.on_event(stored)
        return stored.seq

    def progress(
        self,
        stage: str,
        step: int,
        steps: int,
        eta_s: float | None = None,
        losses: dict[str, float] | None = None,
        preview_png: bytes | None = None,
    ) -> None:
        """Report progress (not stored; subscribers get the newest, slow ones may miss some)."""
        body = {
            "stage": stage,
            "step": int(step),
            "steps": int(steps),
            "eta_s": None if eta_s is None else float(eta_s),
            "losses": {str(k): float(v) for k, v in (losses or {}).items()},
        }
        buffers: Buffers = {} if preview_png is None else {"preview": bytes(preview_png)}
        self._hooks.on_progress(self.job_id, body, buffers)

    def check_cancelled(self) -> None:
        """Raise `JobCancelled` if the job was cancelled (`JobInterrupted` on shutdown)."""
        if self._hooks.shutdown.is_set():
            raise JobInterrupted(f"job {self.job_id} interrupted: the server is stopping")
        if self._hooks.cancel.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")

    def save_checkpoint(self, state: bytes) -> None:
        """Keep `state` in the store as the job's newest checkpoint (fsynced, atomic)."""
        self._store.save_checkpoint(self.job_id, state)

    def load_checkpoint(self) -> bytes | None:
        """The newest checkpoint this job saved, None if it saved none."""
        return self._store.load_checkpoint(self.job_id)

    def set_result(self, glb: bytes) -> None:
        """Hand over the final GLB (what `get_result` returns). Call it before emitting the
        final `mesh` event; the job can only end `done` with a result."""
        if not isinstance(glb, (bytes, bytearray)) or bytes(glb[:4]) != GLB_MAGIC:
            head = bytes(glb[:4]) if isinstance(glb, (bytes, bytearray)) else type(glb).__name__
            raise RunnerError(f"set_result needs GLB bytes starting with b'glTF', got {head!r}")
        self._store.save_result(self.job_id, bytes(glb))
        self._has_result = True


@dataclass(frozen=True)
class Outcome:
    """How running a job ended."""

    state: str | None
    """done, failed or cancelled; None when the stop interrupted it (it stays `running`)."""
    reason: str | None = None
    """The one-line reason of a failed job."""
    error: BaseException | None = None
    """The exception that failed it, for the server to look at (a failed write)."""


def run_job(runner: JobRunner, ctx: JobContext) -> Outcome:
    """Run one job with `runner` and turn the way it ended into the job's last state. The
    in-process worker and every Ray worker (backend.cluster) run jobs through this."""
    try:
        runner.run(ctx)
    except JobInterrupted:
        log.info("job %s interrupted by the stop; it resumes at the next start", ctx.job_id)
        return Outcome(None)
    except JobCancelled:
        return Outcome("cancelled")
    except Exception as exc:
        log.error("job %s failed:\n%s", ctx.job_id, traceback.format_exc())
        if isinstance(exc, JobFailed):
            return Outcome("failed", one_line(exc), exc)
        return Outcome("failed", f"{type(exc).__name__}: {one_line(exc)}", exc)
    if not ctx.has_result:
        return Outcome("failed", "the runner returned without handing over the final GLB (ctx.set_result)")
    if not ctx.final_mesh_emitted:
        return Outcome("failed", "the runner returned without emitting a final mesh event")
    return Outcome("done")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's text, at most 300 characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _check_stage_body(body: dict[str, Any]) -> None:
    if body.get("stage") not in STAGES:
        raise RunnerError(f"stage event field 'stage' must be one of {STAGES}, got {body.get('stage')!r}")
    steps = body.get("steps")
    if not isinstance(steps, int) or steps < 0:
        raise RunnerError(f"stage event field 'steps' must be an int >= 0, got {steps!r}")


def _check_note_body(body: dict[str, Any]) -> None:
    if body.get("stage") not in STAGES:
        raise RunnerError(f"note event field 'stage' must be one of {STAGES}, got {body.get('stage')!r}")
    if not isinstance(body.get("text"), str) or not body["text"]:
        raise RunnerError(f"note event field 'text' must be a non-empty string, got {body.get('text')!r}")


def _complete_mesh_body(body: dict[str, Any], buffers: Buffers) -> None:
    positions = buffers.get("positions")
    faces = buffers.get("faces")
    if not isinstance(positions, np.ndarray) or positions.ndim != 2 or positions.shape[1] != 3:
        raise RunnerError(f"mesh event buffer 'positions' must be an [N,3] array, got {_describe(positions)}")
    if not isinstance(faces, np.ndarray) or faces.ndim != 2 or faces.shape[1] != 3:
        raise RunnerError(f"mesh event buffer 'faces' must be an [M,3] array, got {_describe(faces)}")
    buffers["positions"] = np.ascontiguousarray(positions, dtype=np.float32)
    buffers["faces"] = np.ascontiguousarray(faces, dtype=np.int32)
    for name in ("stage", "step", "final"):
        if name not in body:
            raise RunnerError(f"mesh event needs body field {name!r}")
    if not isinstance(body["final"], bool):
        raise RunnerError(f"mesh event field 'final' must be a bool, got {body['final']!r}")
    body.setdefault("vertex_count", int(positions.shape[0]))
    body.setdefault("face_count", int(faces.shape[0]))
    if "bbox" not in body:
        if len(positions):
            low, high = positions.min(axis=0), positions.max(axis=0)
            body["bbox"] = [[float(v) for v in low], [float(v) for v in high]]
        else:
            body["bbox"] = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {list(value.shape)} dtype {value.dtype}"
    return repr(value) if value is None else type(value).__name__

"""The durable job store: a SQLite table of jobs and their events, buffers as files.

Layout under the store folder (see docs/server.md):

    jobs.sqlite3                  the `jobs` and `events` tables (WAL mode)
    jobs/<job_id>/inputs.bin      the submit's buffers, raw bytes one after another
    jobs/<job_id>/events/<seq>.bin      each event's buffers, raw bytes one after another
    jobs/<job_id>/checkpoint.bin  the runner's newest checkpoint
    jobs/<job_id>/result.glb      the final GLB, kept until `delete_job`

One connection is shared by the server's two threads behind a lock: every method takes the lock
for its whole transaction, so a method is atomic with respect to the other thread. Files are
written to a temporary name, fsynced, then renamed into place, so a crash leaves either the old
or the new file, never half of one.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

# Job states (PROTOCOL.md section 4).
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
FINISHED_STATES = frozenset({DONE, FAILED, CANCELLED})

# Wire dtype code -> numpy dtype (PROTOCOL.md section 2); "bytes" buffers are kept as `bytes`.
_NUMPY_DTYPES = {"u1": "<u1", "i4": "<i4", "u4": "<u4", "f2": "<f2", "f4": "<f4"}
_WIRE_DTYPES = {np.dtype(v).str: k for k, v in _NUMPY_DTYPES.items()}

Buffers = dict[str, "np.ndarray | bytes"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    order_no   INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    state      TEXT NOT NULL,
    stage      TEXT,
    step       INTEGER,
    steps      INTEGER,
    prompt     TEXT NOT NULL,
    params     BLOB NOT NULL,
    inputs     BLOB NOT NULL,
    error      TEXT,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    job_id     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    type       TEXT NOT NULL,
    body       BLOB NOT NULL,
    buffers    BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of the job table, as `list_jobs` and the worker see it."""

    job_id: str
    """32 lowercase hex characters."""
    owner: str
    """The submitting client's public key (Z85), or "" for a job everyone may see (no keys)."""
    kind: str
    """"generate" or "refine_texture"."""
    state: str
    """queued, running, done, failed or cancelled."""
    stage: str | None
    """The newest `stage` event's stage, None before the first."""
    step: int | None
    """The newest `mesh` event's step, None before the first."""
    steps: int | None
    """The newest `stage` event's step count, None before the first."""
    prompt: str
    """The submit's prompt, for listing."""
    params: dict[str, Any]
    """The validated params as a plain map (protocol.params.params_to_dict)."""
    error: str | None
    """The one-line reason of a failed job."""
    last_seq: int
    """The seq of the job's newest stored event, 0 before the first."""
    created_at: float
    """Unix time of the submit."""

    def listing(self) -> dict[str, Any]:
        """The job's entry in a `jobs` reply (PROTOCOL.md section 3)."""
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "stage": self.stage,
            "step": self.step,
            "steps": self.steps,
            "created_at": self.created_at,
            "prompt": self.prompt,
            "last_seq": self.last_seq,
        }


@dataclass(frozen=True)
class StoredEvent:
    """One event of a job's log."""

    job_id: str
    """The job it belongs to."""
    seq: int
    """1, 2, 3... without gaps within the job."""
    type: str
    """The event kind: state, stage or mesh."""
    body: dict[str, Any]
    """The wire body, including the `event` field."""
    buffers: Buffers
    """Name -> numpy array (wire dtypes) or bytes, in the order they were emitted."""
    created_at: float
    """Unix time it was stored."""


class StoreError(Exception):
    """A store operation was asked for something that cannot be (the message says what)."""


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _buffer_spec(name: str, value: np.ndarray | bytes) -> dict[str, Any]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"name": name, "dtype": "bytes", "shape": [len(value)]}
    if not isinstance(value, np.ndarray):
        raise StoreError(f"buffer {name!r} must be a numpy array or bytes, got {type(value).__name__}")
    code = _WIRE_DTYPES.get(value.dtype.newbyteorder("<").str)
    if code is None:
        raise StoreError(f"buffer {name!r} has dtype {value.dtype}, not one of u1 i4 u4 f2 f4")
    return {"name": name, "dtype": code, "shape": list(value.shape)}


def _buffer_bytes(spec: dict[str, Any], value: np.ndarray | bytes) -> bytes:
    if spec["dtype"] == "bytes":
        return bytes(value)
    array = np.ascontiguousarray(value, dtype=_NUMPY_DTYPES[spec["dtype"]])
    return array.tobytes()


def _pack_buffers(buffers: Buffers) -> tuple[list[dict[str, Any]], bytes]:
    """(specs with `offset` and `nbytes`, the buffers' bytes one after another)."""
    specs, chunks, offset = [], [], 0
    for name, value in buffers.items():
        spec = _buffer_spec(name, value)
        data = _buffer_bytes(spec, value)
        spec.update(offset=offset, nbytes=len(data))
        specs.append(spec)
        chunks.append(data)
        offset += len(data)
    return specs, b"".join(chunks)


def _unpack_buffers(specs: list[dict[str, Any]], path: Path) -> Buffers:
    """The buffers `_pack_buffers` wrote to `path`."""
    if not specs:
        return {}
    data = path.read_bytes()
    return {
        spec["name"]: _buffer_value(spec, data[spec["offset"]: spec["offset"] + spec["nbytes"]])
        for spec in specs
    }


def _buffer_value(spec: dict[str, Any], data: bytes) -> np.ndarray | bytes:
    if spec["dtype"] == "bytes":
        return data
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[spec["dtype"]]).reshape(spec["shape"])


class JobStore:
    """The jobs, their events, buffers, checkpoints and results under one folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        """The store folder; created if missing."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.purge_deleted()
        self._interrupted: list[str] = [
            row[0] for row in self._db.execute(
                "SELECT job_id FROM jobs WHERE state = ? AND deleted = 0 ORDER BY order_no", (RUNNING,)
            )
        ]
        """Jobs left `running` by the previous process, to resume before any queued job."""

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # 1. Paths ------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """The folder of one job's files."""
        return self.root / "jobs" / job_id

    def _checkpoint_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoint.bin"

    def _result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.glb"

    # 2. Jobs --------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        owner: str,
        kind: str,
        prompt: str,
        params: dict[str, Any],
        inputs: Buffers,
        max_queued: int | None = None,
    ) -> tuple[JobRecord, StoredEvent] | None:
        """Store a new job with its input buffers and its first event, `state: queued` with the
        job's `position`; None (nothing stored) if `max_queued` jobs already wait.

        The inputs are written before the row, so a crash never leaves a row without its files;
        the row and its first event are stored under one lock, so the worker never sees the job
        before its `queued` event.
        """
        if max_queued is not None and self.count_queued() >= max_queued:
            return None
        job_id = new_job_id()
        specs, data = _pack_buffers(inputs)
        if specs:
            write_file_atomic(self.job_dir(job_id) / "inputs.bin", data)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, owner, kind, state, prompt, params, inputs, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, owner, kind, QUEUED, prompt, msgpack.packb(params), msgpack.packb(specs), time.time()),
            )
            position = self.queue_position(job_id)
            event = self.append_event(job_id, {"event": "state", "state": QUEUED, "position": position})
            record = self.get_job(job_id)
        assert record is not None
        return record, event

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job's record, None if there is none (or it is being deleted)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE job_id = ? AND deleted = 0", (job_id,)
            ).fetchone()
        return None if row is None else self._record(row)

    def list_jobs(self, owner: str | None = None) -> list[JobRecord]:
        """All jobs in submission order; only `owner`'s and everyone's ("") if owner is given."""
        with self._lock:
            if owner is None:
                rows = self._db.execute("SELECT * FROM jobs WHERE deleted = 0 ORDER BY order_no").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE deleted = 0 AND owner IN (?, '') ORDER BY order_no", (owner,)
                ).fetchall()
        return [self._record(row) for row in rows]

    def load_inputs(self, job_id: str) -> Buffers:
        """The submit's buffers of a job, as they were stored."""
        with self._lock:
            row = self._db.execute("SELECT inputs FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r} in the store")
        return _unpack_buffers(msgpack.unpackb(row[0]), self.job_dir(job_id) / "inputs.bin")

    def count_queued(self) -> int:
        """How many jobs wait in the queue (not counting a running one)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND deleted = 0", (QUEUED,)
            ).fetchone()[0]

    def queue_position(self, job_id: str) -> int:
        """How many queued or running jobs were submitted before this one (0 = next to run)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?) AND deleted = 0 AND order_no <"
                " (SELECT order_no FROM jobs WHERE job_id = ?)",
                (QUEUED, RUNNING, job_id),
            ).fetchone()[0]

    def claim_next(self) -> tuple[JobRecord, bool] | None:
        """The job the worker runs next, marked running, and whether it resumes: a job that was
        `running` when this store was opened (the process stopped or died) comes first, then
        the oldest queued one. None if there is nothing to run."""
        with self._lock:
            while self._interrupted:
                record = self.get_job(self._interrupted.pop(0))
                if record is not None and record.state == RUNNING:
                    return record, True
            row = self._db.execute(
                "SELECT job_id FROM jobs WHERE state = ? AND deleted = 0 ORDER BY order_no LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (RUNNING, row[0]))
            record = self.get_job(row[0])
        assert record is not None
        return record, False

    def cancel_if_queued(self, job_id: str) -> StoredEvent | None:
        """Cancel a queued job: store its `state: cancelled` event and return it; None (and no
        change) if the job is not queued (running or finished)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] != QUEUED:
                return None
            return self.append_event(job_id, {"event": "state", "state": CANCELLED}, state=CANCELLED)

    def mark_deleted(self, job_id: str) -> None:
        """Hide a job from every query at once; `purge` removes its rows and files."""
        with self._lock:
            self._db.execute("UPDATE jobs SET deleted = 1 WHERE job_id = ?", (job_id,))

    def is_deleted(self, job_id: str) -> bool:
        """True if the job was marked deleted (or is gone)."""
        with self._lock:
            row = self._db.execute("SELECT deleted FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])

    def purge(self, job_id: str) -> None:
        """Remove a job's rows and its folder."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
            self._db.execute("COMMIT")
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def purge_deleted(self) -> None:
        """Finish deletions a crash interrupted (run at start, when no job runs)."""
        with self._lock:
            ids = [row[0] for row in self._db.execute("SELECT job_id FROM jobs WHERE deleted = 1")]
        for job_id in ids:
            self.purge(job_id)

    # 3. Events ------------------------------------------------------------------------------

    def append_event(
        self,
        job_id: str,
        body: dict[str, Any],
        buffers: Buffers | None = None,
        *,
        state: str | None = None,
        error: str | None = None,
    ) -> StoredEvent:
        """Store the job's next event (seq = last_seq + 1) with its buffers; returns it.

        Buffer files are written before the row that names them; the row, the job's `last_seq`
        (with `stage`/`step`/`steps` for listing) and, when given, its new `state` and `error`
        change in one transaction.
        """
        buffers = dict(buffers or {})
        specs, data = _pack_buffers(buffers)
        event_type = body.get("event")
        if not isinstance(event_type, str):
            raise StoreError(f"event body needs a string 'event' field, got {event_type!r}")
        with self._lock:
            row = self._db.execute("SELECT last_seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id!r} in the store")
            seq = row[0] + 1
            if specs:
                write_file_atomic(self.job_dir(job_id) / "events" / f"{seq}.bin", data)
            now = time.time()
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO events (job_id, seq, type, body, buffers, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, seq, event_type, msgpack.packb(body), msgpack.packb(specs), now),
            )
            self._db.execute("UPDATE jobs SET last_seq = ? WHERE job_id = ?", (seq, job_id))
            if state is not None:
                self._db.execute("UPDATE jobs SET state = ?, error = ? WHERE job_id = ?", (state, error, job_id))
            if event_type == "stage":
                self._db.execute(
                    "UPDATE jobs SET stage = ?, steps = ?, step = 0 WHERE job_id = ?",
                    (body.get("stage"), body.get("steps"), job_id),
                )
            elif event_type == "mesh":
                self._db.execute("UPDATE jobs SET step = ? WHERE job_id = ?", (body.get("step"), job_id))
            self._db.execute("COMMIT")
        return StoredEvent(job_id, seq, event_type, body, buffers, now)

    def events_after(self, job_id: str, after_seq: int, up_to_seq: int | None = None) -> list[StoredEvent]:
        """The job's stored events with after_seq < seq (<= up_to_seq), in seq order, with buffers."""
        limit = up_to_seq if up_to_seq is not None else 2**62
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, body, buffers, created_at FROM events"
                " WHERE job_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (job_id, after_seq, limit),
            ).fetchall()
        events = []
        for seq, event_type, body, specs, created_at in rows:
            buffers = _unpack_buffers(msgpack.unpackb(specs), self.job_dir(job_id) / "events" / f"{seq}.bin")
            events.append(StoredEvent(job_id, seq, event_type, msgpack.unpackb(body), buffers, created_at))
        return events

    # 4. Checkpoints and results -------------------------------------------------------------

    def save_checkpoint(self, job_id: str, state: bytes) -> None:
        """Keep `state` as the job's newest checkpoint (replacing the previous one)."""
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise StoreError(f"checkpoint of job {job_id} must be bytes, got {type(state).__name__}")
        write_file_atomic(self._checkpoint_path(job_id), bytes(state))

    def load_checkpoint(self, job_id: str) -> bytes | None:
        """The job's newest checkpoint, None if it never saved one."""
        path = self._checkpoint_path(job_id)
        return path.read_bytes() if path.exists() else None

    def save_result(self, job_id: str, glb: bytes) -> None:
        """Keep the job's final GLB."""
        write_file_atomic(self._result_path(job_id), bytes(glb))

    def load_result(self, job_id: str) -> bytes | None:
        """The job's final GLB, None if there is none yet."""
        path = self._result_path(job_id)
        return path.read_bytes() if path.exists() else None

    # 5. Rows -> records ---------------------------------------------------------------------

    def _record(self, row: tuple) -> JobRecord:
        (_order, job_id, owner, kind, state, stage, step, steps, prompt, params, _inputs, error,
         last_seq, created_at, _deleted) = row
        return JobRecord(
            job_id=job_id, owner=owner, kind=kind, state=state, stage=stage, step=step, steps=steps,
            prompt=prompt, params=msgpack.unpackb(params), error=error, last_seq=last_seq,
            created_at=created_at,
        )

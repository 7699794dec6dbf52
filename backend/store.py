"""The durable job store: a SQLite table of jobs and their events, buffers as files.

Layout under the store folder (see docs/server.md):

    jobs.sqlite3                  the `jobs` and `events` tables (WAL mode)
    jobs/<job_id>/inputs.bin      the submit's buffers, raw bytes one after another
    jobs/<job_id>/events/<seq>.bin      each event's buffers, raw bytes one after another
    jobs/<job_id>/checkpoint.bin  the runner's newest checkpoint, dropped when the job ends
    jobs/<job_id>/result.glb      the final GLB, kept until `delete_job` or the retention

One connection is shared by the server's two threads behind a lock: every method takes the lock
for its whole transaction, so a method is atomic with respect to the other thread. Files are
written to a temporary name, fsynced, then renamed into place, so a crash leaves either the old
or the new file, never half of one. The folder is 0700 and every file 0600: prompts and results
are the artists' own. Opening a store checks it (backend.store_check): damage is repaired where
it can be and reported in `damage`; the healthy jobs are served as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    deleted    INTEGER NOT NULL DEFAULT 0,
    request_id TEXT,
    nbytes     INTEGER NOT NULL DEFAULT 0,
    ended_at   REAL
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
_ADDED_COLUMNS = {
    "request_id": "TEXT",
    "nbytes": "INTEGER NOT NULL DEFAULT 0",
    "ended_at": "REAL",
}
"""Columns added after the first release: a store made before them gets them when opened."""
TEMP_SUFFIX = ".tmp"
"""Ending of the temporary names `write_file_atomic` writes before its rename."""


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
    order_no: int = 0
    """Position in submission order; the `jobs` paging cursor."""
    nbytes: int = 0
    """Bytes the job's files take (inputs, event buffers, result)."""

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


class QueuedHead(NamedTuple):
    """The oldest queued job of one owner, as `claim_next` offers it to its `pick`."""

    owner: str
    order_no: int
    job_id: str


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


class StoreDamaged(StoreError):
    """A file or row the store needs is missing or damaged; the message names the job and file."""

    def __init__(self, job_id: str | None, where: str, what: str) -> None:
        super().__init__(f"store damaged: {where}: {what}" + (f" (job {job_id})" if job_id else ""))
        self.damage = Damage(where, what, job_id)


@dataclass(frozen=True)
class Damage:
    """One damaged thing in a store, as `welcome`, `ping` and `store check` report it."""

    where: str
    """The file, relative to the store folder."""
    what: str
    """What is wrong and what was done about it."""
    job_id: str | None = None
    """The job it hurts, None for the whole store."""

    def line(self) -> str:
        return f"{self.where}: {self.what}" + (f" (job {self.job_id})" if self.job_id else "")


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def write_file_atomic(path: Path, data: bytes | memoryview | list[bytes | memoryview]) -> int:
    """Write `data` (or its chunks, one after another) to `path`, readable by the owner only,
    through a fsynced temporary file and a rename; returns the bytes written. A failed write
    (a full disk) removes the temporary file and raises."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
    chunks = data if isinstance(data, list) else [data]
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            written = sum(f.write(chunk) for chunk in chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return written


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


def _buffer_bytes(spec: dict[str, Any], value: np.ndarray | bytes) -> memoryview:
    """A byte view of one buffer, copied only when its dtype or layout needs converting."""
    if spec["dtype"] == "bytes":
        return memoryview(value).cast("B")
    array = np.ascontiguousarray(value, dtype=_NUMPY_DTYPES[spec["dtype"]])
    return memoryview(array.reshape(-1).view(np.uint8))


def _pack_buffers(buffers: Buffers) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """(specs with `offset` and `nbytes`, the buffers' bytes as chunks in file order)."""
    specs, chunks, offset = [], [], 0
    for name, value in buffers.items():
        spec = _buffer_spec(name, value)
        data = _buffer_bytes(spec, value)
        spec.update(offset=offset, nbytes=data.nbytes)
        specs.append(spec)
        chunks.append(data)
        offset += data.nbytes
    return specs, chunks


def _unpack_buffers(specs: list[dict[str, Any]], path: Path, job_id: str, root: Path) -> Buffers:
    """The buffers `_pack_buffers` wrote to `path`; StoreDamaged when the file is missing or short."""
    if not specs:
        return {}
    where = str(path.relative_to(root))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreDamaged(job_id, where, "the file is missing") from None
    needed = max(spec["offset"] + spec["nbytes"] for spec in specs)
    if len(data) < needed:
        raise StoreDamaged(job_id, where, f"the file is truncated ({len(data)} of {needed} bytes)")
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

    def __init__(self, root: Path | str, read_only: bool = False) -> None:
        """Open (and create) the store; `read_only` only inspects it (`store check`)."""
        from backend.store_check import check_jobs, open_checked

        self.root = Path(root)
        """The store folder; created if missing (0700)."""
        self._lock = threading.RLock()
        self._db, damage, lost_commits = open_checked(self.root, _SCHEMA, _ADDED_COLUMNS, read_only)
        self.damage: list[Damage] = damage + check_jobs(self, lost_commits, repair=not read_only)
        """What opening found damaged (and repaired where it could); see backend.store_check."""
        if read_only:
            self._interrupted: list[str] = []
            return
        self.purge_deleted()
        self._interrupted: list[str] = [
            row[0] for row in self._db.execute(
                "SELECT job_id FROM jobs WHERE state = ? AND deleted = 0 ORDER BY order_no", (RUNNING,)
            )
        ]
        """Jobs left `running` by the previous process, to resume before any queued job."""

    def close(self) -> None:
        """Fold the write-ahead log into the database and close the connection."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def fold_log(self) -> None:
        """Copy the write-ahead log into the database (run when a job ends): a log damaged later
        can then no longer take finished jobs back."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed at the end, rolled back on any exception, so
        a failed write (a full disk, a damaged page) never leaves a transaction open."""
        with self._lock:
            if self._db.in_transaction:  # nested in a caller's transaction: it commits or rolls back
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _unlink_on_failure(self, path: Path | None) -> Iterator[None]:
        """Remove `path` (a buffer file written for a row) when the row's transaction fails."""
        try:
            yield
        except BaseException:
            if path is not None and not self._db.in_transaction:
                path.unlink(missing_ok=True)
            raise

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
        request_id: str | None = None,
    ) -> tuple[JobRecord, StoredEvent] | None:
        """Store a new job with its input buffers and its first event, `state: queued` with the
        job's `position`; None (nothing stored) if `max_queued` jobs already wait.

        The inputs are written before the row, so a crash never leaves a row without its files;
        the row and its first event are stored in one transaction, so the worker never sees the
        job before its `queued` event. `request_id` (the client's, unique per owner) is kept for
        `find_request`.
        """
        if max_queued is not None and self.count_queued() >= max_queued:
            return None
        job_id = new_job_id()
        specs, chunks = _pack_buffers(inputs)
        try:
            nbytes = write_file_atomic(self.job_dir(job_id) / "inputs.bin", chunks) if specs else 0
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO jobs (job_id, owner, kind, state, prompt, params, inputs, created_at, request_id,"
                    " nbytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, owner, kind, QUEUED, prompt, msgpack.packb(params), msgpack.packb(specs), time.time(),
                     request_id, nbytes),
                )
                position = self.queue_position(job_id)
                event = self.append_event(job_id, {"event": "state", "state": QUEUED, "position": position})
                record = self.get_job(job_id)
        except BaseException:  # nothing of a job that was not stored stays behind
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        assert record is not None
        return record, event

    def find_request(self, owner: str, request_id: str) -> JobRecord | None:
        """The job this owner submitted with this `request_id`, None if there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE owner = ? AND request_id = ? AND deleted = 0", (owner, request_id)
            ).fetchone()
        return None if row is None else self._record(row)

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job's record, None if there is none (or it is being deleted)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE job_id = ? AND deleted = 0", (job_id,)
            ).fetchone()
        return None if row is None else self._record(row)

    def list_jobs(self, owner: str | None = None, after: int = 0, limit: int | None = None) -> list[JobRecord]:
        """Jobs in submission order whose `order_no` is above `after`, at most `limit` of them;
        only `owner`'s and everyone's ("") if owner is given."""
        query, args = "SELECT * FROM jobs WHERE deleted = 0 AND order_no > ?", [after]
        if owner is not None:
            query += " AND owner IN (?, '')"
            args.append(owner)
        query += " ORDER BY order_no LIMIT ?"
        args.append(-1 if limit is None else limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [self._record(row) for row in rows]

    def usage(self, owner: str) -> tuple[int, int]:
        """(jobs, bytes) this owner keeps in the store."""
        with self._lock:
            count, nbytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM jobs WHERE owner = ? AND deleted = 0", (owner,)
            ).fetchone()
        return count, nbytes

    def expired(self, ended_before: float) -> list[str]:
        """Finished jobs that ended before this Unix time (the retention's candidates); a job
        finished in a store older than the `ended_at` column counts from its submit."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE deleted = 0 AND state IN (?, ?, ?)"
                " AND COALESCE(ended_at, created_at) < ?",
                (*sorted(FINISHED_STATES), ended_before),
            ).fetchall()
        return [row[0] for row in rows]

    def load_inputs(self, job_id: str) -> Buffers:
        """The submit's buffers of a job, as they were stored."""
        with self._lock:
            row = self._db.execute("SELECT inputs FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r} in the store")
        return _unpack_buffers(msgpack.unpackb(row[0]), self.job_dir(job_id) / "inputs.bin", job_id, self.root)

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

    def claim_next(self, pick: Callable[[list[QueuedHead]], str] | None = None) -> tuple[JobRecord, bool] | None:
        """The job a worker runs next, marked running, and whether it resumes: a job that was
        `running` when this store was opened (the process stopped or died) or that was handed
        back with `resume_later` comes first, then a queued one: `pick` chooses among the oldest
        queued job of each owner (by default the oldest of all). None if there is nothing to run."""
        with self._lock:
            while self._interrupted:
                record = self.get_job(self._interrupted.pop(0))
                if record is not None and record.state == RUNNING:
                    return record, True
            heads = [QueuedHead(*row) for row in self._db.execute(
                "SELECT owner, MIN(order_no), job_id FROM jobs WHERE state = ? AND deleted = 0 GROUP BY owner",
                (QUEUED,),
            )]
            if not heads:
                return None
            job_id = pick(heads) if pick is not None else min(heads, key=lambda head: head.order_no).job_id
            with self._transaction() as db:
                db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (RUNNING, job_id))
            record = self.get_job(job_id)
        assert record is not None
        return record, False

    def resume_later(self, job_id: str) -> None:
        """Hand a running job back (its worker died): the next `claim_next` returns it, resumed."""
        with self._lock:
            self._interrupted.append(job_id)

    def take_back(self, job_id: str) -> bool:
        """Withdraw a job waiting to resume (handed back, or running when the store was opened)
        before a worker claims it; False if it is not waiting."""
        with self._lock:
            if job_id not in self._interrupted:
                return False
            self._interrupted.remove(job_id)
            return True

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
        with self._transaction() as db:
            db.execute("UPDATE jobs SET deleted = 1 WHERE job_id = ?", (job_id,))

    def is_deleted(self, job_id: str) -> bool:
        """True if the job was marked deleted (or is gone)."""
        with self._lock:
            row = self._db.execute("SELECT deleted FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])

    def purge(self, job_id: str) -> None:
        """Remove a job's rows and its folder."""
        with self._transaction() as db:
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
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
        change in one transaction. A finished state also drops the job's checkpoint.
        """
        buffers = dict(buffers or {})
        specs, chunks = _pack_buffers(buffers)
        event_type = body.get("event")
        if not isinstance(event_type, str):
            raise StoreError(f"event body needs a string 'event' field, got {event_type!r}")
        with self._lock:
            row = self._db.execute("SELECT last_seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id!r} in the store")
            seq = row[0] + 1
            path = self.job_dir(job_id) / "events" / f"{seq}.bin"
            nbytes = write_file_atomic(path, chunks) if specs else 0
            now = time.time()
            with self._unlink_on_failure(path if specs else None), self._transaction() as db:
                db.execute(
                    "INSERT INTO events (job_id, seq, type, body, buffers, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, seq, event_type, msgpack.packb(body), msgpack.packb(specs), now),
                )
                db.execute("UPDATE jobs SET last_seq = ?, nbytes = nbytes + ? WHERE job_id = ?", (seq, nbytes, job_id))
                if state is not None:
                    ended_at = now if state in FINISHED_STATES else None
                    db.execute("UPDATE jobs SET state = ?, error = ?, ended_at = ? WHERE job_id = ?",
                               (state, error, ended_at, job_id))
                if event_type == "stage":
                    db.execute(
                        "UPDATE jobs SET stage = ?, steps = ?, step = 0 WHERE job_id = ?",
                        (body.get("stage"), body.get("steps"), job_id),
                    )
                elif event_type == "mesh":
                    db.execute("UPDATE jobs SET step = ? WHERE job_id = ?", (body.get("step"), job_id))
        if state in FINISHED_STATES:
            self._checkpoint_path(job_id).unlink(missing_ok=True)
        return StoredEvent(job_id, seq, event_type, body, buffers, now)

    def fail_lost(self, job_id: str, reason: str, lost: int) -> None:
        """End `failed` a job whose newest `lost` events may have been lost to damage, without
        reusing a seq a client may have seen: those seqs are filled with the same final event."""
        body = {"event": "state", "state": FAILED, "error": reason}
        with self._transaction():
            for _ in range(lost + 1):
                self.append_event(job_id, body, state=FAILED, error=reason)

    def events_after(self, job_id: str, after_seq: int, up_to_seq: int | None = None) -> list[StoredEvent]:
        """The job's stored events with after_seq < seq (<= up_to_seq), in seq order, with buffers.
        StoreDamaged names the first event file that is missing or truncated."""
        limit = up_to_seq if up_to_seq is not None else 2**62
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, body, buffers, created_at FROM events"
                " WHERE job_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (job_id, after_seq, limit),
            ).fetchall()
        events = []
        for seq, event_type, body, specs, created_at in rows:
            path = self.job_dir(job_id) / "events" / f"{seq}.bin"
            buffers = _unpack_buffers(msgpack.unpackb(specs), path, job_id, self.root)
            events.append(StoredEvent(job_id, seq, event_type, msgpack.unpackb(body), buffers, created_at))
        return events

    # 4. Checkpoints and results -------------------------------------------------------------

    def save_checkpoint(self, job_id: str, state: bytes) -> None:
        """Keep `state` as the job's newest checkpoint (replacing the previous one)."""
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise StoreError(f"checkpoint of job {job_id} must be bytes, got {type(state).__name__}")
        write_file_atomic(self._checkpoint_path(job_id), memoryview(state))

    def load_checkpoint(self, job_id: str) -> bytes | None:
        """The job's newest checkpoint, None if it never saved one."""
        path = self._checkpoint_path(job_id)
        return path.read_bytes() if path.exists() else None

    def save_result(self, job_id: str, glb: bytes) -> None:
        """Keep the job's final GLB."""
        nbytes = write_file_atomic(self._result_path(job_id), memoryview(glb))
        with self._transaction() as db:
            db.execute("UPDATE jobs SET nbytes = nbytes + ? WHERE job_id = ?", (nbytes, job_id))

    def load_result(self, job_id: str) -> bytes | None:
        """The job's final GLB, None if there is none yet."""
        path = self._result_path(job_id)
        return path.read_bytes() if path.exists() else None

    def has_result(self, job_id: str) -> bool:
        """Whether the job's final GLB is stored (without reading it)."""
        return self._result_path(job_id).exists()

    # 5. Rows -> records ---------------------------------------------------------------------

    def _record(self, row: sqlite3.Row | tuple) -> JobRecord:
        (order_no, job_id, owner, kind, state, stage, step, steps, prompt, params, _inputs, error,
         last_seq, created_at, _deleted, _request_id, nbytes, _ended_at) = row
        return JobRecord(
            job_id=job_id, owner=owner, kind=kind, state=state, stage=stage, step=step, steps=steps,
            prompt=prompt, params=msgpack.unpackb(params), error=error, last_seq=last_seq,
            created_at=created_at, order_no=order_no, nbytes=nbytes,
        )

"""Opening a job store safely, and `python -m backend store check DIR`.

What a crash, a full disk or a damaged disk can leave, and what opening does about it:

- temporary files of writes that never finished: removed;
- a zero-byte database next to job folders (the records are gone): moved aside, reported, the
  folders kept;
- a damaged write-ahead log (a frame whose checksum fails before later commits): SQLite stops
  reading the log there, so those transactions are lost. The log is copied aside, reported, and
  every unfinished job ends `failed` with its seqs moved past every one that may have been sent;
- a damaged database (`PRAGMA quick_check` fails, or the file is not a database): moved aside,
  and every row that can still be read is copied into a new one;
- an event or input file that is missing or truncated: reported with its job; that job's
  requests get an error naming the file, the other jobs are served as before;
- an event file newer than its job's last stored seq: the job ends `failed` past that seq.

`store check` runs the same checks on a store no server has open and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from backend.store import FINISHED_STATES, TEMP_SUFFIX, Damage

if TYPE_CHECKING:
    from backend.store import JobStore

DB_NAME = "jobs.sqlite3"
WAL_MAGIC = (0x377F0682, 0x377F0683)
"""The write-ahead log's header magic: little- and big-endian checksums."""
SALVAGE_SKIPS = 10_000
"""Unreadable rows skipped one by one while copying a damaged table, before giving up on it."""


# 1. The write-ahead log -------------------------------------------------------------------


def _checksum(data: bytes, s1: int, s2: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (walChecksumBytes) of `data`, continuing from (s1, s2)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        s1 = (s1 + words[index] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[index + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def scan_wal(path: Path) -> tuple[int, int] | None:
    """(first damaged frame, commits at or after it) of a write-ahead log; None when SQLite will
    read every committed transaction in it (a torn uncommitted tail is not damage)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 32:
        return None  # no header yet: SQLite ignores the file
    magic, _version, page_size, _checkpoint, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    frame_bytes = 24 + page_size
    frames = (len(data) - 32) // frame_bytes if page_size >= 512 else 0
    big_endian = magic == WAL_MAGIC[1]
    header_ok = magic in WAL_MAGIC and _checksum(data[:24], 0, 0, big_endian) == (c1, c2)
    first_bad = None if header_ok else 0
    commits, (s1, s2) = 0, (c1, c2)
    for index in range(frames):
        offset = 32 + index * frame_bytes
        _page, commit, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">6I", data[offset: offset + 24])
        salts_match = (f_salt1, f_salt2) == (salt1, salt2)
        if first_bad is None:
            s1, s2 = _checksum(data[offset: offset + 8], s1, s2, big_endian)
            s1, s2 = _checksum(data[offset + 24: offset + frame_bytes], s1, s2, big_endian)
            if not salts_match or (s1, s2) != (f_c1, f_c2):
                first_bad = index + 1
        if first_bad is not None and salts_match and commit:
            commits += 1
    return None if first_bad is None or commits == 0 else (first_bad, commits)


# 2. Opening -------------------------------------------------------------------------------


def _aside(path: Path, stamp: str) -> Path:
    """Move a damaged file out of the way, keeping it for whoever investigates."""
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    path.replace(target)
    return target


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)


def _quick_check(db: sqlite3.Connection) -> str | None:
    """None when SQLite finds the database sound, else what it found (first lines)."""
    try:
        rows = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if rows == ["ok"] else "; ".join(rows)


def _readable_rows(db: sqlite3.Connection, table: str) -> tuple[list[str], list[tuple]]:
    """(column names, every row of `table` that can still be read), skipping damaged ones."""
    try:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    except sqlite3.DatabaseError:
        return [], []
    rows: list[tuple] = []
    rowid, skips = 0, 0
    while skips < SALVAGE_SKIPS:
        try:
            batch = db.execute(f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 256", (rowid,)).fetchall()
        except sqlite3.DatabaseError:
            rowid, skips = rowid + 1, skips + 1
            continue
        if not batch:
            break
        rows.extend(row[1:] for row in batch)
        rowid = batch[-1][0]
    return columns, rows


def _salvage(damaged: Path, db: sqlite3.Connection) -> tuple[int, int]:
    """Copy the readable rows of a damaged database into `db`; (jobs, events) copied."""
    try:
        old = _connect(damaged, read_only=True)
    except sqlite3.Error:
        return 0, 0
    copied = []
    with old:
        for table in ("jobs", "events"):
            columns, rows = _readable_rows(old, table)
            if rows:
                marks = ", ".join("?" * len(columns))
                db.executemany(f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            copied.append(len(rows))
    old.close()
    return copied[0], copied[1]


def _prepare(db: sqlite3.Connection, schema: str, added_columns: dict[str, str]) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, declaration in added_columns.items():
        if name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")


def open_checked(
    root: Path, schema: str, added_columns: dict[str, str], read_only: bool = False
) -> tuple[sqlite3.Connection, list[Damage], int]:
    """(connection, damage found, transactions lost from the log) of the store at `root`.

    Repairs what the module docstring says unless `read_only`; then it only reports.
    """
    damage: list[Damage] = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    jobs_dir, db_path = root / "jobs", root / DB_NAME
    wal_path = db_path.with_name(f"{DB_NAME}-wal")
    if not read_only:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)
        for folder, _dirs, names in os.walk(jobs_dir):
            for name in names:
                if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                    os.unlink(os.path.join(folder, name))
    folders = sum(1 for _ in jobs_dir.iterdir()) if jobs_dir.is_dir() else 0
    # 1. A zero-byte database with job folders: its records are gone.
    if db_path.exists() and db_path.stat().st_size == 0 and folders and not wal_path.exists():
        what = f"the database is empty (0 bytes) while jobs/ holds {folders} job folders: their records are lost"
        if not read_only:
            what += f"; the empty file was moved to {_aside(db_path, stamp).name}, the folders are kept"
        damage.append(Damage(DB_NAME, what))
    # 2. The write-ahead log, read before SQLite replays it.
    lost_commits = 0
    scanned = scan_wal(wal_path)
    if scanned is not None:
        first_bad, lost_commits = scanned
        what = f"frame {first_bad} is damaged: the {lost_commits} transactions committed from it on are lost"
        if not read_only:
            copy = wal_path.with_name(f"{wal_path.name}.damaged-{stamp}")
            shutil.copyfile(wal_path, copy)
            what += f"; a copy is kept as {copy.name}"
        damage.append(Damage(wal_path.name, what))
    # 3. The database itself.
    if not read_only and not db_path.exists():
        db_path.touch(mode=0o600)
    db = _connect(db_path, read_only)
    problem = _quick_check(db)
    if problem is not None and not read_only:
        db.close()
        moved = _aside(db_path, stamp)
        for extra in ("-wal", "-shm"):
            side = db_path.with_name(DB_NAME + extra)
            if side.exists():
                _aside(side, stamp)
        db_path.touch(mode=0o600)
        db = _connect(db_path, read_only)
        _prepare(db, schema, added_columns)
        jobs, events = _salvage(moved, db)
        problem += f"; moved to {moved.name}, {jobs} jobs and {events} events recovered into a new database"
    if problem is not None:
        damage.append(Damage(DB_NAME, f"the database is damaged: {problem}"))
    if not read_only:
        _prepare(db, schema, added_columns)
        db_path.chmod(0o600)
    return db, damage, lost_commits


# 3. Jobs against their files --------------------------------------------------------------


def _buffer_files(events_dir: Path) -> dict[int, int]:
    """Seq -> size of each event buffer file in a job's `events/` folder."""
    try:
        entries = list(os.scandir(events_dir))
    except FileNotFoundError:
        return {}
    sizes = {}
    for entry in entries:
        stem, dot, ext = entry.name.partition(".")
        if stem.isdigit() and dot and ext == "bin":
            sizes[int(stem)] = entry.stat().st_size
    return sizes


def _check_size(damage: list[Damage], job_id: str, where: str, have: int | None, needed: int) -> None:
    if have is None or have < needed:
        what = "the file is missing" if have is None else f"the file is truncated ({have} of {needed} bytes)"
        damage.append(Damage(where, what, job_id))


def check_jobs(store: JobStore, lost_commits: int, repair: bool) -> list[Damage]:
    """Every job against its files and rows (module docstring); ends damaged unfinished jobs
    `failed` when `repair`. Returns what was found."""
    try:
        return _check_jobs(store, lost_commits, repair)
    except sqlite3.DatabaseError as exc:  # only a read-only check of an unrepaired database gets here
        return [Damage(DB_NAME, f"the jobs cannot be read: {exc}")]


def _check_jobs(store: JobStore, lost_commits: int, repair: bool) -> list[Damage]:
    damage: list[Damage] = []
    db, root = store._db, store.root
    rows = db.execute("SELECT job_id, state, last_seq, inputs FROM jobs WHERE deleted = 0").fetchall()
    stored = dict(db.execute("SELECT job_id, COUNT(*) FROM events GROUP BY job_id").fetchall())
    needed: dict[str, list[tuple[int, int]]] = {}  # job -> (seq, bytes its buffer file must hold)
    for job_id, seq, specs in db.execute("SELECT job_id, seq, buffers FROM events WHERE length(buffers) > 1"):
        specs = msgpack.unpackb(specs)
        needed.setdefault(job_id, []).append((seq, max(spec["offset"] + spec["nbytes"] for spec in specs)))
    for job_id, state, last_seq, inputs in rows:
        files = _buffer_files(store.job_dir(job_id) / "events")
        # 1. Events newer than the row (the log lost them), or rows missing (salvaged database).
        beyond = max(files, default=0) - last_seq
        kept = stored.get(job_id, 0)
        lost = max(beyond, lost_commits if state not in FINISHED_STATES else 0)
        if beyond > 0 or kept < last_seq or lost > 0:
            reason = (f"the store lost events of this job ({kept} of {max(last_seq, last_seq + beyond)} kept)"
                      " after damage; submit it again")
            if beyond > 0 or kept < last_seq:
                damage.append(Damage(f"jobs/{job_id}/events", reason, job_id))
            if repair and (state not in FINISHED_STATES or beyond > 0):
                store.fail_lost(job_id, reason, max(lost, 0))
        # 2. Input (of jobs still to run) and event buffer files: present and long enough.
        specs = msgpack.unpackb(inputs)
        if specs and state not in FINISHED_STATES:
            path = store.job_dir(job_id) / "inputs.bin"
            _check_size(damage, job_id, f"jobs/{job_id}/inputs.bin", path.stat().st_size if path.exists() else None,
                        max(spec["offset"] + spec["nbytes"] for spec in specs))
        for seq, size in needed.get(job_id, ()):
            _check_size(damage, job_id, f"jobs/{job_id}/events/{seq}.bin", files.get(seq), size)
    # 3. Folders without a row.
    known = {row[0] for row in rows}
    jobs_dir = root / "jobs"
    for name in sorted(os.listdir(jobs_dir)) if jobs_dir.is_dir() else ():
        if name not in known:
            damage.append(Damage(f"jobs/{name}", "a job folder without a record in the database (kept, not served)"))
    return damage


# 4. The command line ----------------------------------------------------------------------


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `store check DIR`."""
    store = subparsers.add_parser("store", help="inspect a job store")
    commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="report damage in a store no server has open (changes nothing)")
    check.add_argument("dir", type=Path, help="the store folder (serve --store)")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print one line per damaged thing; exit 0 when there is none, 1 otherwise, 2 without a store."""
    from backend.store import JobStore

    if not (args.dir / DB_NAME).exists():
        print(f"error: {args.dir} holds no {DB_NAME}; is it a job store?")
        return 2
    store = JobStore(args.dir, read_only=True)
    try:
        for item in store.damage:
            print(item.line())
        summary = f"{len(store.damage)} damaged" if store.damage else f"{len(store.list_jobs())} jobs, no damage found"
    finally:
        store.close()
    print(f"{args.dir}: {summary}")
    return 1 if store.damage else 0

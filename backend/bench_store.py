"""What checking a store at every start costs: `python -m backend.bench_store --store DIR [--jobs N]
[--events M]`.

Fills a fresh store with N finished jobs of M mesh events each (a 10-vertex mesh per event, so
every event has a buffer file to check), then times opening it (every check of
backend.store_check), `store check`, and scanning a write-ahead log of the given size. Prints one
JSON object. DIR must not exist; a tmpfs (/dev/shm) keeps the filling quick.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from backend.store import JobStore
from backend.store_check import DB_NAME, scan_wal

MESH = {"positions": np.zeros((10, 3), np.float32), "faces": np.zeros((4, 3), np.int32)}


def fill(directory: Path, jobs: int, events: int) -> None:
    store = JobStore(directory)
    store._db.execute("PRAGMA synchronous=OFF")  # only the filling: the timed opens use FULL
    for _ in range(jobs):
        record, _ = store.create_job(owner="", kind="generate", prompt="a cup", params={"prompt": "a cup"}, inputs={})
        for step in range(events):
            store.append_event(record.job_id, {"event": "mesh", "stage": "coarse", "step": step, "final": False}, MESH)
        store.append_event(record.job_id, {"event": "state", "state": "done"}, state="done")
    store.close()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.bench_store", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a folder that does not exist yet")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--events", type=int, default=10)
    args = parser.parse_args(argv)
    if args.store.exists():
        parser.error(f"--store {args.store} exists; give a new folder")
    fill_s = timed(lambda: fill(args.store, args.jobs, args.events))
    open_s = timed(lambda: JobStore(args.store).close())
    from backend.__main__ import main as backend_main

    with contextlib.redirect_stdout(io.StringIO()):
        check_s = timed(lambda: backend_main(["store", "check", str(args.store)]))
    # A write-ahead log as a busy server leaves it: 1,000 pages (SQLite's auto-checkpoint size).
    store = JobStore(args.store)
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    store._db.execute("UPDATE events SET created_at = created_at + 1")
    wal = args.store / f"{DB_NAME}-wal"
    wal_s = timed(lambda: scan_wal(wal))
    print(json.dumps({
        "jobs": args.jobs, "events_per_job": args.events, "fill_s": round(fill_s, 2),
        "open_with_checks_s": round(open_s, 3), "store_check_s": round(check_s, 3),
        "wal_bytes": wal.stat().st_size, "scan_wal_s": round(wal_s, 3),
    }))
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

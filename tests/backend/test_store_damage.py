"""A damaged store: missing and truncated files, a damaged database or write-ahead log, a zero-byte
database, leftovers of crashed writes. The store opens, says what is damaged, serves the healthy
jobs and never reuses a seq; `python -m backend store check` says the same without changing it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.__main__ import main
from backend.server import LocalWorker, Server, ServerConfig, WorkerInfo
from backend.store import JobStore
from backend.store_check import DB_NAME, scan_wal
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import REPO_ROOT, MeshRunner, ServerThread, collect_until_final
from tests.backend.test_server import HELLO, request, start, submit, wait_for  # noqa: F401 (fixture)

MESH = {"positions": np.arange(30, dtype=np.float32).reshape(10, 3), "faces": np.array([[0, 1, 2]], np.int32)}


def finished_job(store: JobStore, meshes: int = 3, state: str = "done") -> str:
    record, _ = store.create_job(owner="", kind="generate", prompt="a cup", params={"prompt": "a cup"}, inputs={})
    store.append_event(record.job_id, {"event": "state", "state": "running"}, state="running")
    for step in range(meshes):
        store.append_event(record.job_id, {"event": "mesh", "stage": "coarse", "step": step, "final": False}, MESH)
    store.append_event(record.job_id, {"event": "state", "state": state}, state=state)
    return record.job_id


def check(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["store", "check", str(directory)])
    return status, capsys.readouterr().out


def test_missing_and_truncated_event_files_hurt_only_their_job(start: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "store"
    store = JobStore(directory)
    hurt, healthy = finished_job(store), finished_job(store)
    store.close()
    events = directory / "jobs" / hurt / "events"
    (events / "3.bin").unlink()
    with open(events / "4.bin", "r+b") as f:
        f.truncate(10)
    status, out = check(directory, capsys)
    assert status == 1
    assert f"jobs/{hurt}/events/3.bin: the file is missing (job {hurt})" in out
    assert f"jobs/{hurt}/events/4.bin: the file is truncated (10 of 132 bytes) (job {hurt})" in out
    # The server starts, reports both files, answers the hurt job's subscriber with what is
    # damaged, and serves the healthy job in full.
    server = start(MeshRunner(), store_dir=directory)
    client = start.client(server.address)
    welcome = request(client, "hello", HELLO).body
    assert welcome["degraded"] is True
    assert any("3.bin: the file is missing" in line for line in welcome["problems"])
    assert request(client, "subscribe", {"job_id": hurt, "after_seq": 0}).type == "subscribed"
    while True:
        msg = client.recv(5000)
        assert msg is not None, "no error for the damaged job"
        if msg.type == "error":
            break
    assert msg.job_id == hurt and "events/3.bin: the file is missing" in msg.body["message"]
    assert request(client, "subscribe", {"job_id": healthy, "after_seq": 0}).type == "subscribed"
    assert [e.seq for e in collect_until_final(client, healthy)] == [1, 2, 3, 4, 5, 6]
    assert request(client, "ping").body["degraded"] is True


def test_a_zero_byte_database_is_reported_not_silently_emptied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "store"
    store = JobStore(directory)
    finished_job(store)
    store.close()
    (directory / DB_NAME).write_bytes(b"")
    status, out = check(directory, capsys)
    assert status == 1 and "the database is empty (0 bytes) while jobs/ holds 1 job folders" in out
    store = JobStore(directory)
    lines = [item.line() for item in store.damage]
    assert any("moved to jobs.sqlite3.damaged-" in line for line in lines)
    assert any("a job folder without a record" in line for line in lines)
    assert list(directory.glob("jobs.sqlite3.damaged-*"))
    finished_job(store)  # the new database works
    store.close()


def test_a_damaged_database_is_salvaged_into_a_new_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "store"
    store = JobStore(directory)
    jobs = [finished_job(store, meshes=1) for _ in range(150)]
    store.close()
    db = directory / DB_NAME
    size = db.stat().st_size
    with open(db, "r+b") as f:  # garbage over two pages in the middle
        f.seek((size // 4096 // 2) * 4096)
        f.write(os.urandom(8192))
    status, out = check(directory, capsys)
    assert status == 1 and "the database is damaged" in out
    store = JobStore(directory)
    line = next(item.line() for item in store.damage if item.where == DB_NAME)
    assert "recovered into a new database" in line
    kept = [job.job_id for job in store.list_jobs()]
    assert kept and set(kept) <= set(jobs)
    assert all(store.get_job(job_id).state in ("done", "failed") for job_id in kept)
    assert finished_job(store)  # writable, no transaction left open
    store.close()
    assert check(directory, capsys)[0] in (0, 1)  # a second open finds no new damage in the database
    assert "the database is damaged" not in capsys.readouterr().out


_WRITER = """
import json, os, sys
import numpy as np
from tests.backend.test_store_damage import MESH, finished_job
from backend.store import JobStore
store = JobStore(sys.argv[1])
done = finished_job(store, meshes=4)
record, _ = store.create_job(owner="", kind="generate", prompt="b", params={"prompt": "b"}, inputs={})
store.append_event(record.job_id, {"event": "state", "state": "running"}, state="running")
for step in range(8):
    store.append_event(record.job_id, {"event": "mesh", "stage": "coarse", "step": step, "final": False}, MESH)
print(json.dumps({job_id: store.get_job(job_id).last_seq for job_id in (done, record.job_id)}))
sys.stdout.flush()
os._exit(0)  # like kill -9: the write-ahead log is left as it is
"""


def test_a_damaged_write_ahead_log_never_reuses_a_seq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "store"
    written = subprocess.run([sys.executable, "-c", _WRITER, str(directory)], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    seen = json.loads(written.stdout)  # job -> the last seq a client may have seen
    wal = directory / f"{DB_NAME}-wal"
    assert scan_wal(wal) is None  # a log SQLite reads in full
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    frames = (len(data) - 32) // (24 + page_size)
    at = 32 + (frames // 3) * (24 + page_size) + 24 + 100
    data[at: at + 16] = os.urandom(16)
    wal.write_bytes(bytes(data))
    first_bad, lost = scan_wal(wal)
    assert first_bad == frames // 3 + 1 and lost > 0
    status, out = check(directory, capsys)
    assert status == 1 and f"jobs.sqlite3-wal: frame {first_bad} is damaged" in out
    store = JobStore(directory)
    assert any(item.where == wal.name for item in store.damage)
    for job_id, last_seen in seen.items():
        job = store.get_job(job_id)
        if job is None:  # the job's row itself was in the lost part: its folder is reported
            assert any(item.where == f"jobs/{job_id}" for item in store.damage)
            continue
        events = store.events_after(job_id, 0)
        assert [e.seq for e in events] == list(range(1, job.last_seq + 1))
        if job.state == "failed":  # taken back by the lost log: it ends past every seq sent
            assert job.last_seq > last_seen and events[-1].body["state"] == "failed"
        else:
            assert job.state == "done" and job.last_seq == last_seen
    store.close()


def test_leftovers_of_crashed_writes_are_removed(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = JobStore(directory)
    job_id = finished_job(store)
    store.close()
    leftover = directory / "jobs" / job_id / "events" / ".5.bin.123.456.tmp"
    leftover.write_bytes(b"half a write")
    store = JobStore(directory)
    assert not leftover.exists() and store.damage == []
    store.close()


def test_one_workers_store_problem_is_not_cleared_by_another_worker(tmp_path: Path) -> None:
    """Two workers; the row of one's job is damaged as it runs, so that worker cannot store the
    end. Its line stays in `degraded` while the other worker goes on serving, and goes once the
    row is whole again and the end is stored."""
    runner = MeshRunner(step_delay_s=0.1, steps_per_stage=4)
    workers = [LocalWorker(runner, WorkerInfo(name, "localhost", None)) for name in ("one", "two")]
    store_dir = tmp_path / "store"
    server = ServerThread(Server(ServerConfig(store_dir=store_dir, bind="tcp://127.0.0.1:*"), None, None, workers))
    client = ClientSocket(server.address)
    db = sqlite3.connect(store_dir / DB_NAME)

    def stuck(worker: str) -> bool:
        return any(line.startswith(f"worker {worker} cannot use the store")
                   for line in request(client, "ping").body["problems"])

    try:
        damaged = submit(client, "suzanne")
        wait_for(lambda: any(job.get("worker") for job in request(client, "list_jobs").body["jobs"]))
        busy = request(client, "list_jobs").body["jobs"][0]["worker"]["name"]
        (params,) = db.execute("SELECT params FROM jobs WHERE job_id = ?", (damaged,)).fetchone()
        with db:
            db.execute("UPDATE jobs SET params = ? WHERE job_id = ?", (b"\xc1", damaged))  # not msgpack
        wait_for(lambda: stuck(busy), 30)
        served = submit(client, "suzanne")  # the other worker runs it while the line stays
        assert collect_until_final(client, served, timeout_s=30)[-1].body["state"] == "done"
        deadline = time.monotonic() + 4  # the other worker's loop goes round every second
        while time.monotonic() < deadline:
            assert stuck(busy)
            time.sleep(0.2)
        with db:
            db.execute("UPDATE jobs SET params = ? WHERE job_id = ?", (params, damaged))
        assert collect_until_final(client, damaged, timeout_s=30)[-1].body["state"] == "done"
        wait_for(lambda: not request(client, "ping").body["degraded"], 20)
    finally:
        db.close()
        client.close()
        server.stop()

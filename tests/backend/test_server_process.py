"""The server as a real process: kill -9 and restart, SIGTERM, the command line's refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from protocol.messages import Message
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import REPO_ROOT, ServerProcess, collect_until_final, start_server_process

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Servers started by a test; each is killed afterwards, whatever happened."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def clients() -> Iterator[list[ClientSocket]]:
    opened: list[ClientSocket] = []
    yield opened
    for client in opened:
        client.close()


def connect(clients: list[ClientSocket], address: str) -> ClientSocket:
    client = ClientSocket(address)
    clients.append(client)
    return client


def submit(client: ClientSocket, prompt: str) -> str:
    reply = client.request(Message("submit", {"kind": "generate", "params": {"prompt": prompt}}), timeout_s=10)
    assert reply.type == "accepted", reply.body
    return reply.body["job_id"]


def events_until(client: ClientSocket, job_id: str, count: int, timeout_s: float = 20) -> list[Message]:
    events: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} events in {timeout_s} s"
        msg = client.recv(100)
        if msg is not None and msg.type == "event" and msg.job_id == job_id:
            events.append(msg)
    return events


def position(event: Message, steps_per_stage: int) -> int:
    """A mesh event's place in the whole job: the number of steps done when it was emitted."""
    stage_index = ("coarse", "geometry", "texture").index(event.body["stage"])
    return stage_index * steps_per_stage + event.body["step"]


def test_killed_server_restarts_with_its_events_and_resumes_from_checkpoint(
    tmp_path: Path, processes: list[ServerProcess], clients: list[ClientSocket]
) -> None:
    store = tmp_path / "store"
    args = ("--step-delay", "0.05", "--steps-per-stage", "6")
    first = start_server_process(store, tmp_path / "first.log", *args)
    processes.append(first)
    client = connect(clients, first.address)
    running = submit(client, "suzanne")
    waiting = submit(client, "teapot")
    # 1. Let the first job stream part of its first stage, then kill -9 mid-job.
    before = events_until(client, running, 7)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    steps = 6
    seen_meshes = [position(e, steps) for e in before if e.body["event"] == "mesh"]
    # 2. Restart on the same store: the stored events keep their seqs, the job resumes.
    second = start_server_process(store, tmp_path / "second.log", *args)
    processes.append(second)
    client = connect(clients, second.address)
    client.request(Message("subscribe", {"job_id": running, "after_seq": 0}), timeout_s=10)
    log = collect_until_final(client, running, timeout_s=30)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert [(e.seq, e.body) for e in log[: len(before)]] == [(e.seq, e.body) for e in before]
    resumed = [e for e in log if e.body.get("state") == "running"]
    assert len(resumed) == 2 and resumed[1].body.get("resumed") is True
    stored_before = [position(e, steps) for e in log[: log.index(resumed[1])] if e.body["event"] == "mesh"]
    first_after = next(position(e, steps) for e in log[log.index(resumed[1]) + 1:] if e.body["event"] == "mesh")
    # the checkpoint follows each mesh event, so a kill between the two repeats at most that step
    assert max(seen_meshes) <= stored_before[-1] <= first_after <= stored_before[-1] + 1
    assert log[-1].body["state"] == "done"
    # 3. The job that was queued stays queued across the kill and runs after.
    client.request(Message("subscribe", {"job_id": waiting, "after_seq": 0}), timeout_s=10)
    waited = collect_until_final(client, waiting, timeout_s=30)
    assert [e.body.get("state") for e in waited if e.body["event"] == "state"] == ["queued", "running", "done"]
    assert client.request(Message("get_result", {"job_id": running}), timeout_s=10).type == "result"


def test_sigterm_stops_gracefully_and_the_job_resumes(
    tmp_path: Path, processes: list[ServerProcess], clients: list[ClientSocket]
) -> None:
    store = tmp_path / "store"
    first = start_server_process(store, tmp_path / "first.log", "--step-delay", "0.05", "--steps-per-stage", "20")
    processes.append(first)
    client = connect(clients, first.address)
    job_id = submit(client, "suzanne")
    events_until(client, job_id, 5)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(10) == 0
    assert "interrupted by the stop" in first.log() and "stopped" in first.log()
    second = start_server_process(store, tmp_path / "second.log", "--step-delay", "0", "--steps-per-stage", "20")
    processes.append(second)
    client = connect(clients, second.address)
    jobs = client.request(Message("list_jobs"), timeout_s=10).body["jobs"]
    assert [j["job_id"] for j in jobs] == [job_id]
    client.request(Message("subscribe", {"job_id": job_id, "after_seq": 0}), timeout_s=10)
    log = collect_until_final(client, job_id, timeout_s=30)
    assert log[-1].body["state"] == "done"
    assert sum(e.body.get("state") == "running" for e in log) == 2


def test_non_loopback_bind_without_keys_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backend", "serve", "--bind", "tcp://0.0.0.0:0", "--store", str(tmp_path / "s")],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to bind tcp://0.0.0.0:0 without CurveZMQ keys" in lines[0]
    assert not (tmp_path / "s").exists()


def test_insecure_bind_warns_at_start(tmp_path: Path, processes: list[ServerProcess]) -> None:
    server = start_server_process(tmp_path / "store", tmp_path / "log", "--insecure", bind="tcp://0.0.0.0:*")
    processes.append(server)
    assert "INSECURE" in server.log()


def test_help_and_imports_need_no_torch() -> None:
    code = (
        "import sys, backend, backend.server, backend.store, backend.jobs, backend.__main__ as m\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "m.build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'torch was imported by --help'\n"
        "assert 'ray' not in sys.modules, 'ray was imported without --ray'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, check=True, timeout=60)
    shown = subprocess.run([sys.executable, "-m", "backend", "serve", "--help"], cwd=REPO_ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    for flag in ("--bind", "--store", "--keys", "--insecure", "--models", "--max-queue", "--device"):
        assert flag in shown.stdout


def test_serve_preset_runs_every_job_at_that_preset(tmp_path: Path, suzanne_obj: Path, clients) -> None:
    from backend.config import PRESETS

    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "backend", "serve", "--bind", "tcp://127.0.0.1:*", "--store", str(tmp_path / "s"),
               "--models", f"oracle:{suzanne_obj}", "--device", "cpu", "--preset", "tiny"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log_path.read_text()
        assert "every job runs at the tiny preset" in text, text
        client = connect(clients, text.split("listening on ")[1].split()[0])
        reply = client.request(Message("submit", {"kind": "generate", "params": {"prompt": "a monkey head",
                                                                                 "quality": "standard"}}), timeout_s=10)
        assert reply.type == "accepted", reply.body
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first coarse progress says how many steps the stage has
            msg = client.recv(100)
            if msg is not None and msg.body.get("stage") == "coarse" and "steps" in msg.body:
                break
        else:
            pytest.fail(f"no coarse progress in 120 s:\n{log_path.read_text()}")
        assert msg.body["steps"] == PRESETS["tiny"].coarse.steps != PRESETS["standard"].coarse.steps
    finally:
        process.kill()
        process.wait(10)


def test_an_unknown_preset_is_refused_naming_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "backend", "serve", "--preset", "huge", "--store", str(tmp_path / "s")],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--preset" in done.stderr and "'huge'" in done.stderr
    assert not (tmp_path / "s").exists()

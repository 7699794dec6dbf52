"""The server process against exhausted resources: a flood of idle connections under a 1,024
descriptor limit, and writes that fail (a file-size limit of one byte stands in for a full disk:
every write the store makes fails, as on a full disk, until the limit is lifted)."""

from __future__ import annotations

import resource
import signal
import socket
import time
from pathlib import Path

from protocol.messages import Message
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import collect_until_final, start_server_process
from tests.backend.test_server import submit, wait_for


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_idle_connections_cannot_starve_the_running_job_or_new_clients(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "store", tmp_path / "log", "--step-delay", "0.05",
                                  "--steps-per-stage", "40", preexec_fn=_limit_descriptors)
    idle: list[socket.socket] = []
    client = ClientSocket(server.address)
    try:
        job_id = submit(client, "suzanne")
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        for _ in range(1100):
            idle.append(socket.create_connection((host, int(port))))
        # A new client is refused while the flood holds every slot, and gets in once libzmq
        # has closed the connections that never finished a handshake (5 s).
        started = time.monotonic()
        answered = False
        while not answered and time.monotonic() - started < 20:
            late = ClientSocket(server.address)
            try:
                answered = late.request(Message("ping"), timeout_s=2).type == "pong"
            except TimeoutError:
                time.sleep(0.5)
            finally:
                late.close()
        assert answered
        assert collect_until_final(client, job_id, timeout_s=60)[-1].body["state"] == "done"
    finally:
        for conn in idle:
            conn.close()
        client.close()
        server.kill()
    assert "Too many open files" not in server.log()


def _fail_big_writes() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process


def test_failing_writes_end_the_job_failed_and_the_server_recovers(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "store", tmp_path / "log", "--step-delay", "0.05",
                                  "--steps-per-stage", "30", preexec_fn=_fail_big_writes)
    pid = server.process.pid
    client = ClientSocket(server.address)
    try:
        job_id = submit(client, "suzanne")
        wait_for(lambda: client.request(Message("list_jobs")).body["jobs"][0]["state"] == "running", 20)
        # 1. The disk "fills": the running job's next write fails; the server says it is degraded.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        wait_for(lambda: client.request(Message("ping")).body["degraded"], 20)
        problems = client.request(Message("ping")).body["problems"]
        assert any(line.startswith("writing the store failed") for line in problems), problems
        queued = client.request(Message("submit", {"kind": "generate", "params": {"prompt": "suzanne"}}))
        # 2. Space is back: the worker stores how the job ended, and new jobs run.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        events = collect_until_final(client, job_id, timeout_s=60)
        reason = events[-1].body["error"]
        assert events[-1].body["state"] == "failed" and ("File too large" in reason or "disk I/O error" in reason)
        if queued.type == "accepted":  # a submit while the disk was full may be refused instead
            assert collect_until_final(client, queued.body["job_id"], timeout_s=60)[-1].body["state"] in ("done", "failed")
        fresh = submit(client, "suzanne")
        assert collect_until_final(client, fresh, timeout_s=60)[-1].body["state"] == "done"
        wait_for(lambda: not client.request(Message("ping")).body["degraded"], 20)
        assert server.process.poll() is None
    finally:
        client.close()
        server.kill()

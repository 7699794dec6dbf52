"""`python -m backend serve --ray auto` as a process: it starts its own local Ray (a module of its
own, so only one Ray runs at a time in the suite), serves a job on a CPU worker with the tiny
models, and SIGTERM interrupts the running job on its worker and leaves it `running` with its
checkpoint, to resume at the next start; the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from backend.store import JobStore
from protocol.transport import ClientSocket
from tests.backend.test_pipeline_server import close_all, events_of, start_server
from tests.backend.test_server import request
from tests.backend.test_server_cluster import LONGER, SHORT, collect_jobs, generate


def test_serve_ray_auto_runs_a_job_and_sigterm_leaves_it_to_resume(tmp_path: Path) -> None:
    store = tmp_path / "store"
    processes: list[subprocess.Popen] = []
    clients: list[ClientSocket] = []
    try:
        server, address = start_server(store, tmp_path / "serve.log", "--ray", "auto", "--workers", "1")
        processes.append(server)
        clients.append(ClientSocket(address))
        welcome = request(clients[0], "hello", {"client_name": "tests", "client_version": "0", "protocol": 1})
        assert welcome.body["device"] == "cpu" and welcome.body["degraded"] is False
        job_id = generate(clients[0], LONGER)
        events_of(clients[0], job_id, lambda m: m.body["event"] == "stage" and m.body["stage"] == "geometry", 120)
        jobs = request(clients[0], "list_jobs").body["jobs"]
        assert jobs[0]["worker"]["name"].endswith("/worker0") and jobs[0]["worker"]["gpu"] is None
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        close_all(clients, processes)
    assert "INFO dreamloom.server: stopped" in (tmp_path / "serve.log").read_text()
    reopened = JobStore(store, read_only=True)
    try:
        job = reopened.get_job(job_id)
        assert job is not None and job.state == "running"
        assert reopened.load_checkpoint(job_id) is not None
    finally:
        reopened.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serve_ray_auto_runs_one_worker_per_gpu(tmp_path: Path) -> None:
    gpus = torch.cuda.device_count()
    processes: list[subprocess.Popen] = []
    clients: list[ClientSocket] = []
    try:
        server, address = start_server(tmp_path / "store", tmp_path / "serve.log", "--ray", "auto", "--device", "cuda")
        processes.append(server)
        clients.append(ClientSocket(address))
        welcome = request(clients[0], "hello", {"client_name": "tests", "client_version": "0", "protocol": 1})
        assert welcome.body["device"].startswith("cuda" if gpus == 1 else f"{gpus} workers: cuda"), welcome.body
        job_ids = [generate(clients[0], SHORT) for _ in range(gpus)]
        seen_gpus: set[str] = set()  # the GPUs the jobs were seen running on, over the whole run
        deadline = time.monotonic() + 120
        while len(seen_gpus) < gpus and time.monotonic() < deadline:
            running = [job for job in request(clients[0], "list_jobs").body["jobs"] if "worker" in job]
            seen_gpus |= {job["worker"]["gpu"] for job in running}
            time.sleep(0.05)
        assert seen_gpus == {str(index) for index in range(gpus)}  # every GPU ran one of the jobs
        for events in collect_jobs(clients[0], job_ids, timeout_s=300).values():
            assert events[-1].body == {"event": "state", "state": "done"}
    finally:
        close_all(clients, processes)

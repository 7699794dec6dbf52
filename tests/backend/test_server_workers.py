"""Several workers behind one server when one of them dies under its job (in-process workers: the
death is a `WorkerLost` raised where a Ray actor's would be, so its timing is the test's)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from backend.jobs import run_job
from backend.server import LocalWorker, Server, ServerConfig, WorkerInfo, WorkerLost
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import MeshRunner, ServerThread, collect_until_final
from tests.backend.test_server import request, submit, wait_for


class DiesOnce(LocalWorker):
    """Dies half a second into its first job (the other worker has taken the other job by then),
    then restarts when `recover_event` is set (a Ray actor loading its models again)."""

    def __init__(self, runner, info, recovers: bool) -> None:
        super().__init__(runner, info)
        self.died = threading.Event()
        self.recovers = recovers
        self.recover_event = threading.Event()
        self.recovered = threading.Event()

    def execute(self, ctx, record):
        if not self.died.is_set():
            time.sleep(0.5)
            self.died.set()
            raise WorkerLost("the actor died")
        return run_job(self.runner, ctx)

    def recover(self) -> bool:
        self.recover_event.wait(60)
        self.recovered.set()
        return self.recovers


def _serve(tmp_path: Path, dying: DiesOnce) -> tuple[ServerThread, ClientSocket]:
    other = LocalWorker(MeshRunner(step_delay_s=0.1, steps_per_stage=20), WorkerInfo("B", "node", None))
    config = ServerConfig(store_dir=tmp_path / "store", bind="tcp://127.0.0.1:*")
    thread = ServerThread(Server(config, None, None, [dying, other]))
    return thread, ClientSocket(thread.address)


def _worker_of(client: ClientSocket, job_id: str) -> str | None:
    jobs = request(client, "list_jobs").body["jobs"]
    return next((job.get("worker") or {}).get("name") for job in jobs if job["job_id"] == job_id)


def test_a_dead_workers_restart_leaves_the_job_it_handed_back_running_where_it_resumed(tmp_path: Path) -> None:
    dying = DiesOnce(MeshRunner(step_delay_s=0.1, steps_per_stage=20), WorkerInfo("A", "node", None), recovers=True)
    thread, client = _serve(tmp_path, dying)
    try:
        jobs = [submit(client), submit(client)]  # one on each worker
        wait_for(dying.died.is_set, 10)
        victim = next(job for job in jobs if _worker_of(client, job) != "B")
        wait_for(lambda: _worker_of(client, victim) == "B", 60)  # B took it up after its own job
        dying.recover_event.set()  # A comes back while B runs the job A handed back
        wait_for(dying.recovered.is_set, 10)
        time.sleep(0.3)  # A's thread goes on past its restart
        assert _worker_of(client, victim) == "B"  # the job keeps its worker in `jobs`
        assert request(client, "cancel", {"job_id": victim}).type == "cancelled"
        assert collect_until_final(client, victim, 60)[-1].body["state"] == "cancelled"
    finally:
        dying.recover_event.set()
        client.close()
        thread.stop()


def test_a_job_cancelled_while_it_waits_to_resume_ends_cancelled(tmp_path: Path) -> None:
    dying = DiesOnce(MeshRunner(step_delay_s=0.1, steps_per_stage=20), WorkerInfo("A", "node", None), recovers=False)
    thread, client = _serve(tmp_path, dying)
    try:
        first, second = submit(client), submit(client)  # one on each worker
        wait_for(dying.died.is_set, 10)
        victim = next(job for job in (first, second) if _worker_of(client, job) != "B")
        # A died under `victim`, which waits for B to finish its own job: cancel it meanwhile.
        assert request(client, "cancel", {"job_id": victim}).type == "cancelled"
        assert collect_until_final(client, victim, 60)[-1].body["state"] == "cancelled"
        assert collect_until_final(client, next(job for job in (first, second) if job != victim), 60)[-1].body[
            "state"] == "done"
    finally:
        dying.recover_event.set()
        client.close()
        thread.stop()

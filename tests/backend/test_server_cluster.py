"""Jobs on Ray workers behind the one ZeroMQ front (`serve --ray`), and the fair queue.

One local Ray for the module (2 logical CPUs for the workers, 2 logical GPUs, no dashboard); the
workers run on the CPU with the tiny models (backend.guidance's seeded tiny set), loaded once per
worker. Tiny jobs of a few steps each, so the module stays near a minute on two shared cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from backend.server import Server, ServerConfig
from protocol.keys import authorize, create_client_keys, create_server_keys, load_public_key
from protocol.messages import Message
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import MeshRunner, ServerThread, collect_until_final
from tests.backend.test_pipeline_server import close_all, events_of, start_server
from tests.backend.test_server import request, start, wait_for  # noqa: F401 (fixture)

SHORT = {"steps": {"coarse": 2, "geometry": 2, "texture": 1}, "mesh_every": 10, "preview_every": 2,
         "texture_size": 256}
"""A tiny generate job: seconds on the CPU."""
LONGER = {"steps": {"coarse": 2, "geometry": 100, "texture": 1}, "mesh_every": 10, "preview_every": 2,
          "texture_size": 256}
"""Long enough in the geometry stage to be killed there."""


def generate(client: ClientSocket, params: dict[str, Any], prompt: str = "a cat") -> str:
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": prompt, **params}})
    assert reply.type == "accepted", reply.body
    return reply.body["job_id"]


def running_workers(client: ClientSocket) -> dict[str, str]:
    """job_id -> the name of the worker running it, for the running jobs of `jobs`."""
    return {job["job_id"]: job["worker"]["name"] for job in request(client, "list_jobs").body["jobs"]
            if job["state"] == "running" and "worker" in job}


def collect_jobs(client: ClientSocket, job_ids: list[str], timeout_s: float) -> dict[str, list[Message]]:
    """Every event of each job until each one's last state event."""
    events: dict[str, list[Message]] = {job_id: [] for job_id in job_ids}
    ended: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while ended != set(job_ids):
        assert time.monotonic() < deadline, {job_id: [e.body for e in got] for job_id, got in events.items()}
        msg = client.recv(100)
        if msg is None or msg.type != "event" or msg.job_id not in events:
            continue
        events[msg.job_id].append(msg)
        if msg.body["event"] == "state" and msg.body["state"] in ("done", "failed", "cancelled"):
            ended.add(msg.job_id)
    return events


def assert_contiguous(events: list[Message]) -> None:
    assert [event.seq for event in events] == list(range(1, len(events) + 1))


# The fair queue (no Ray: the in-process worker picks jobs the same way) ---------------------------


def test_one_keys_batch_does_not_starve_another_key(start: Any, tmp_path: Path) -> None:
    server_dir = tmp_path / "server_keys"
    create_server_keys(server_dir)
    for name in ("alice", "bob"):
        create_client_keys(tmp_path / name)
        authorize(server_dir, tmp_path / name / "client.key")
    server = start(MeshRunner(step_delay_s=0.05, steps_per_stage=2), keys_dir=server_dir)
    server_key = load_public_key(server_dir / "server.key")
    alice, bob = (start.client(server.address, server_public_key=server_key, client_keys_dir=tmp_path / name)
                  for name in ("alice", "bob"))
    # Alice's batch of 6 is queued first (one runs), then Bob's one job.
    batch = [generate(alice, {}, "suzanne") for _ in range(6)]
    late = generate(bob, {}, "suzanne")
    collect_until_final(bob, late, timeout_s=30)
    for job_id in batch:
        collect_until_final(alice, job_id, timeout_s=30)
    store = server.server.store
    started = {job_id: next(event.created_at for event in store.events_after(job_id, 0)
                            if event.body.get("state") == "running")
               for job_id in [*batch, late]}
    order = sorted(started, key=started.get)
    # Bob's job runs right after the one of Alice's that was running, not after her batch.
    assert order.index(late) == 1, [batch.index(j) if j in batch else "bob" for j in order]


# On Ray -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The workers' model cache (DREAMLOOM_CACHE_DIR): a copy of the tiny models, so the last
    test can break it under them."""
    from backend.guidance.tiny import tiny_models_dir

    built = tiny_models_dir()
    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(built, cache / built.name)
    previous = os.environ.get("DREAMLOOM_CACHE_DIR")
    os.environ["DREAMLOOM_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["DREAMLOOM_CACHE_DIR"]
    else:
        os.environ["DREAMLOOM_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def ray_address(model_cache: Path) -> Iterator[str]:
    """One local Ray for the module: 4 logical CPUs (two servers' workers), 2 logical GPUs. Its
    workers inherit this environment (the model cache)."""
    import ray

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A front in this process with two Ray workers on the CPU (tiny models), for the module."""
    from backend.cluster import start_workers, stop_workers

    pool = start_workers("tiny", "cpu", 2)
    store = tmp_path_factory.mktemp("ray") / "store"
    thread = ServerThread(Server(ServerConfig(store_dir=store, bind="tcp://127.0.0.1:*"), None, None, pool))
    yield thread
    thread.stop()
    stop_workers(pool)


@pytest.fixture
def client(ray_server: ServerThread) -> Iterator[ClientSocket]:
    opened = ClientSocket(ray_server.address)
    yield opened
    opened.close()


def test_two_jobs_run_at_once_on_two_workers(ray_server: ServerThread, client: ClientSocket) -> None:
    job_ids = [generate(client, SHORT), generate(client, SHORT)]
    # Both are running at once, each on its own worker, as `jobs` says.
    wait_for(lambda: len(running_workers(client)) == 2, 30)
    workers = running_workers(client)
    assert len(set(workers.values())) == 2
    assert set(workers.values()) == {worker.info.name for worker in ray_server.server.workers}
    for job_id, events in collect_jobs(client, job_ids, timeout_s=120).items():
        assert_contiguous(events)
        assert events[-1].body == {"event": "state", "state": "done"}
        final = [event for event in events if event.body["event"] == "mesh" and event.body["final"]]
        assert len(final) == 1 and {"positions", "faces", "uvs", "texture"} <= set(final[0].buffers)
        result = request(client, "get_result", {"job_id": job_id})
        assert result.type == "result" and bytes(result.buffers["model"][:4]) == b"glTF"
    welcome = request(client, "hello", {"client_name": "tests", "client_version": "0", "protocol": 1})
    assert welcome.body["device"].startswith("2 workers: cpu")


def test_a_running_job_is_cancelled_on_its_worker(ray_server: ServerThread, client: ClientSocket) -> None:
    job_id = generate(client, LONGER)
    events_of(client, job_id, lambda m: m.body["event"] == "stage" and m.body["stage"] == "geometry", 120)
    assert request(client, "cancel", {"job_id": job_id}).type == "cancelled"
    assert collect_until_final(client, job_id, timeout_s=30)[-1].body == {"event": "state", "state": "cancelled"}
    wait_for(lambda: not running_workers(client), 10)


def test_a_worker_killed_mid_job_has_its_job_finished_by_the_other(ray_server: ServerThread,
                                                                    client: ClientSocket) -> None:
    job_id = generate(client, LONGER)
    before = events_of(client, job_id, lambda m: m.body["event"] == "stage" and m.body["stage"] == "geometry", 120)
    killed = running_workers(client)[job_id]
    victim = next(worker for worker in ray_server.server.workers if worker.info.name == killed)
    killed_pid = victim.pid
    os.kill(killed_pid, signal.SIGKILL)
    # The job resumes from its newest checkpoint on the other worker...
    resumed = events_of(client, job_id, lambda m: m.body.get("resumed") is True, 60)
    assert resumed[-1].body == {"event": "state", "state": "running", "resumed": True}
    assert running_workers(client)[job_id] != killed
    after = collect_until_final(client, job_id, timeout_s=120)
    # ... and every event reaches the client once, in order, as the store has them.
    events = before + resumed + after
    assert_contiguous(events)
    assert sum(event.body.get("resumed") is True for event in events) == 1
    assert events[-1].body == {"event": "state", "state": "done"}
    assert [event.body for event in ray_server.server.store.events_after(job_id, 0)] == [e.body for e in events]
    # Ray restarts the killed worker; it loads its models again and is back in the pool.
    wait_for(lambda: victim.pid != killed_pid, 240)  # a restart imports torch and loads the models again
    assert victim in ray_server.server.workers and len(ray_server.server.workers) == 2


def test_a_job_that_kills_its_workers_twice_in_a_row_fails(ray_server: ServerThread, client: ClientSocket) -> None:
    job_id = generate(client, LONGER)
    names, pids = [], []
    for started in (lambda m: m.body.get("stage") == "geometry", lambda m: m.body.get("resumed") is True):
        events_of(client, job_id, started, 120)
        names.append(running_workers(client)[job_id])
        worker = next(worker for worker in ray_server.server.workers if worker.info.name == names[-1])
        pids.append(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)
    end = collect_until_final(client, job_id, timeout_s=60)[-1]
    assert end.body["state"] == "failed"
    assert end.body["error"].startswith(f"the workers running this job died 2 times in a row ({', '.join(names)})")
    # Both come back; the next job runs.
    wait_for(lambda: all(worker.pid not in pids for worker in ray_server.server.workers), 240)
    assert collect_until_final(client, generate(client, SHORT), timeout_s=60)[-1].body["state"] == "done"


def test_the_front_killed_and_restarted_finds_its_jobs(ray_address: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    flags = ("--ray", ray_address, "--workers", "1")
    processes: list[subprocess.Popen] = []
    clients: list[ClientSocket] = []
    try:
        first, address = start_server(store, tmp_path / "first.log", *flags)
        processes.append(first)
        clients.append(ClientSocket(address))
        job_id = generate(clients[-1], LONGER)
        before = events_of(clients[-1], job_id, lambda m: m.body["event"] == "stage"
                           and m.body["stage"] == "geometry", timeout_s=120)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second, address = start_server(store, tmp_path / "second.log", *flags)
        processes.append(second)
        clients.append(ClientSocket(address))
        request(clients[-1], "subscribe", {"job_id": job_id, "after_seq": 0})
        log = events_of(clients[-1], job_id, lambda m: m.body["event"] == "state"
                        and m.body["state"] in ("done", "failed", "cancelled"), timeout_s=120)
        assert_contiguous(log)
        assert [event.body for event in log[: len(before)]] == [event.body for event in before]
        assert log[-1].body == {"event": "state", "state": "done"}
        assert sum(event.body.get("resumed") is True for event in log) == 1
    finally:
        close_all(clients, processes)


def test_a_worker_whose_models_fail_to_load_leaves_the_pool_and_the_other_serves(
        ray_server: ServerThread, client: ClientSocket, model_cache: Path) -> None:
    # The model cache breaks (a file where its folder was); then the worker running a job dies.
    shutil.rmtree(model_cache)
    model_cache.write_text("not a folder")
    job_id = generate(client, LONGER)
    events_of(client, job_id, lambda m: m.body["event"] == "stage" and m.body["stage"] == "geometry", 120)
    name = running_workers(client)[job_id]
    victim = next(worker for worker in ray_server.server.workers if worker.info.name == name)
    os.kill(victim.pid, signal.SIGKILL)
    # Ray restarts it, it cannot load its models: it is named and out of the pool...
    wait_for(lambda: victim not in ray_server.server.workers, 60)
    assert victim.problem.startswith("its models failed to load: ")
    pong = request(client, "ping")
    assert pong.body["degraded"] is True
    assert any(line.startswith(f"worker {name} left the pool: its models failed to load") for line in pong.body["problems"])
    # ... while the other finishes the job, and serves the next one.
    assert collect_until_final(client, job_id, timeout_s=120)[-1].body == {"event": "state", "state": "done"}
    assert len(ray_server.server.workers) == 1
    assert collect_until_final(client, generate(client, SHORT), timeout_s=60)[-1].body["state"] == "done"


# Bad input at start -------------------------------------------------------------------------------


def test_a_cluster_without_gpus_is_refused_unless_device_cpu(ray_address: str) -> None:
    import ray

    from backend.cluster import plan_workers
    from backend.server import ConfigError

    resources = ray.cluster_resources()
    assert plan_workers(resources, "cuda", None) == (2, {"num_cpus": 0, "num_gpus": 1})
    without_gpus = {name: value for name, value in resources.items() if name != "GPU"}
    with pytest.raises(ConfigError, match=r"has no GPU node; .* or pass --device cpu$"):
        plan_workers(without_gpus, "cuda", None)
    assert plan_workers(without_gpus, "cpu", 3) == (3, {"num_cpus": 1, "num_gpus": 0})
    with pytest.raises(ConfigError, match=r"^--workers 9: the Ray cluster has 4 CPUs"):
        plan_workers(without_gpus, "cpu", 9)


def test_an_unreachable_ray_address_fails_at_start_in_seconds_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "backend", "serve", "--ray", f"127.0.0.1:{port}",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2 and time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m backend serve: error: --ray 127.0.0.1:{port}: cannot reach")


def test_a_workers_context_knows_whether_the_front_stored_the_result() -> None:
    """The relay store a job's context writes to on a worker answers `has_result` as the front's
    store would: from what the front had stored when it started the job, then from the job."""
    from queue import SimpleQueue

    from backend.cluster import JobSpec, RelayStore
    from backend.jobs import JobContext, JobHooks
    from protocol.params import validate_submit
    from tests.backend.mesh_runner import MESHES_DIR, glb_bytes, load_obj

    params = {"prompt": "cube"}

    def context(stored: bool) -> tuple[JobContext, SimpleQueue]:
        out: SimpleQueue = SimpleQueue()
        spec = JobSpec(job_id="0" * 32, kind="generate", params=params, inputs={}, resumed=stored,
                       checkpoint=None, has_result=stored, last_seq=3)
        ctx = JobContext(job_id=spec.job_id, kind="generate", params=validate_submit("generate", params, {}),
                         inputs={}, resumed=stored, store=RelayStore(spec, out),
                         hooks=JobHooks(on_event=lambda event: None, on_progress=lambda *args: None))
        return ctx, out

    assert context(stored=True)[0].has_result
    ctx, out = context(stored=False)
    assert not ctx.has_result
    glb = glb_bytes(*load_obj(MESHES_DIR / "suzanne.obj"))
    ctx.set_result(glb)
    assert ctx.has_result and out.get_nowait() == ("result", glb)

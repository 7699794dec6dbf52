"""The server over real TCP on loopback, running in a thread of the test process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import trimesh
import zmq

from backend.server import Server, ServerConfig
from protocol.codec import encode
from protocol.keys import authorize, create_client_keys, create_server_keys, load_public_key
from protocol.messages import TAG, Message
from protocol.transport import ClientSocket
from tests.backend.mesh_runner import MESHES_DIR, MeshRunner, ServerThread, collect_until_final, load_obj

HELLO = {"client_name": "tests", "client_version": "0", "protocol": 1}


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """start(runner=..., **config) -> ServerThread; every server and client is closed after."""
    threads: list[ServerThread] = []
    clients: list[ClientSocket] = []

    def _start(runner: Any = None, missing: str | None = None, **config: Any) -> ServerThread:
        config.setdefault("bind", "tcp://127.0.0.1:*")
        config.setdefault("store_dir", tmp_path / f"store{len(threads)}")
        if runner is None and missing is None:
            runner = MeshRunner()
        thread = ServerThread(Server(ServerConfig(**config), runner, missing))
        threads.append(thread)
        return thread

    def _client(address: str, **kwargs: Any) -> ClientSocket:
        client = ClientSocket(address, **kwargs)
        clients.append(client)
        return client

    _start.client = _client
    yield _start
    for client in clients:
        client.close()
    for thread in threads:
        thread.stop()


def request(client: ClientSocket, type: str, body: dict | None = None, buffers: dict | None = None) -> Message:
    return client.request(Message(type, body or {}, buffers or {}), timeout_s=10)


def submit(client: ClientSocket, prompt: str = "suzanne", **params: Any) -> str:
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": prompt, **params}})
    assert reply.type == "accepted", reply.body
    return reply.body["job_id"]


def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def job_states(client: ClientSocket) -> dict[str, str]:
    return {job["job_id"]: job["state"] for job in request(client, "list_jobs").body["jobs"]}


def test_hello_reports_runner_and_limits(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    welcome = request(client, "hello", HELLO)
    assert welcome.type == "welcome"
    assert welcome.body["protocol"] == 1
    assert welcome.body["device"] == "cpu"
    assert welcome.body["models"] == {"mesh": "mesh_runner"}
    assert welcome.body["max_message_bytes"] > 0 and welcome.body["heartbeat_ms"] > 0
    wrong = request(client, "hello", {**HELLO, "protocol": 2})
    assert (wrong.type, wrong.body["code"], wrong.body["field"]) == ("error", "unsupported_protocol", "protocol")


def test_submit_streams_events_then_result(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    job_id = submit(client, "suzanne")
    events = collect_until_final(client, job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [(e.body["event"], e.body.get("state")) for e in events]
    assert kinds[:2] == [("state", "queued"), ("state", "running")]
    assert kinds[-1] == ("state", "done")
    assert [e.body["stage"] for e in events if e.body["event"] == "stage"] == ["coarse", "geometry", "texture"]
    verts_vx3, faces_fx3 = load_obj(MESHES_DIR / "suzanne.obj")
    final = events[-2]
    assert final.body["event"] == "mesh" and final.body["final"] is True
    np.testing.assert_array_equal(final.buffers["positions"], verts_vx3)
    np.testing.assert_array_equal(final.buffers["faces"], faces_fx3)
    assert final.body["vertex_count"] == len(verts_vx3) and final.body["face_count"] == len(faces_fx3)
    np.testing.assert_allclose(final.body["bbox"], [verts_vx3.min(0), verts_vx3.max(0)], rtol=1e-6)
    result = request(client, "get_result", {"job_id": job_id})
    assert (result.type, result.body["format"]) == ("result", "glb")
    mesh = trimesh.load(trimesh.util.wrap_as_stream(bytes(result.buffers["model"])), file_type="glb", force="mesh")
    assert len(mesh.faces) == len(faces_fx3)


def test_refine_job_streams_the_mesh_it_was_sent(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    verts_vx3, faces_fx3 = load_obj(MESHES_DIR / "teapot.obj")
    reply = request(client, "submit", {"kind": "refine_texture", "params": {"prompt": "a teapot"}},
                    {"positions": verts_vx3, "faces": faces_fx3})
    events = collect_until_final(client, reply.body["job_id"])
    meshes = [e for e in events if e.body["event"] == "mesh"]
    assert {e.body["stage"] for e in meshes} == {"texture"}
    np.testing.assert_array_equal(meshes[-1].buffers["faces"], faces_fx3)


def test_bad_params_queue_nothing(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": "x", "seed": -4}})
    assert (reply.body["code"], reply.body["field"]) == ("bad_params", "params.seed")
    reply = request(client, "submit", {"kind": "sculpt", "params": {"prompt": "x"}})
    assert (reply.body["code"], reply.body["field"]) == ("bad_params", "kind")
    assert request(client, "list_jobs").body["jobs"] == []


def test_without_pipeline_submit_is_refused_not_faked(start: Any) -> None:
    server = start(runner=None, missing="the generation pipeline is not installed: No module named 'backend.pipeline'")
    client = start.client(server.address)
    assert request(client, "hello", HELLO).body["models"] == {}
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": "a chair"}})
    assert reply.body["code"] == "internal"
    assert "pipeline is not installed" in reply.body["message"]
    assert request(client, "submit", {"kind": "generate", "params": {}}).body["code"] == "bad_params"
    assert request(client, "list_jobs").body["jobs"] == []


def test_cancel_queued_is_immediate_and_running_stops_at_next_step(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.05, steps_per_stage=200))
    client = start.client(server.address)
    running = submit(client, "suzanne")
    queued = submit(client, "suzanne")
    wait_for(lambda: job_states(client)[running] == "running")
    assert request(client, "cancel", {"job_id": queued}).type == "cancelled"
    assert job_states(client)[queued] == "cancelled"
    assert request(client, "cancel", {"job_id": running}).type == "cancelled"
    wait_for(lambda: job_states(client)[running] == "cancelled", timeout_s=5)
    events = {job: collect_until_final(client, job) for job in (queued, running)}
    assert [e.body.get("state") for e in events[queued]] == ["queued", "cancelled"]
    assert events[running][-1].body == {"event": "state", "state": "cancelled"}
    assert request(client, "get_result", {"job_id": running}).body["code"] == "not_ready"


def test_jobs_run_in_submission_order_and_queue_full(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.02, steps_per_stage=4), max_queue=2)
    client = start.client(server.address)
    first = submit(client, "suzanne")
    wait_for(lambda: job_states(client)[first] == "running")
    second, third = submit(client, "suzanne"), submit(client, "suzanne")
    full = request(client, "submit", {"kind": "generate", "params": {"prompt": "suzanne"}})
    assert full.body["code"] == "queue_full"
    assert list(job_states(client)) == [first, second, third]
    for job in (first, second, third):
        assert collect_until_final(client, job)[-1].body["state"] == "done"
    store = server.server.store
    span = {}
    for job in (first, second, third):
        events = store.events_after(job, 0)
        running = next(e for e in events if e.body.get("state") == "running")
        span[job] = (running.created_at, events[-1].created_at)
    assert span[first][1] <= span[second][0] and span[second][1] <= span[third][0]


def test_list_jobs_and_get_result_not_ready(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.05, steps_per_stage=100))
    client = start.client(server.address)
    job_id = submit(client, "spot")
    wait_for(lambda: job_states(client)[job_id] == "running")
    wait_for(lambda: request(client, "list_jobs").body["jobs"][0]["step"])
    (job,) = request(client, "list_jobs").body["jobs"]
    assert job["kind"] == "generate" and job["prompt"] == "spot" and job["stage"] == "coarse"
    assert job["last_seq"] >= 4 and job["steps"] == 100
    reply = request(client, "get_result", {"job_id": job_id})
    assert (reply.body["code"], reply.body["field"]) == ("not_ready", "job_id")
    unknown = request(client, "get_result", {"job_id": "0" * 32})
    assert unknown.body["code"] == "unknown_job"


def test_delete_job_cancels_and_removes_files(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.05, steps_per_stage=100))
    client = start.client(server.address)
    store = server.server.store
    running = submit(client, "suzanne")
    wait_for(lambda: job_states(client)[running] == "running")
    assert request(client, "delete_job", {"job_id": running}).type == "deleted"
    assert running not in job_states(client)
    assert request(client, "subscribe", {"job_id": running, "after_seq": 0}).body["code"] == "unknown_job"
    wait_for(lambda: not store.job_dir(running).exists())
    # the worker goes on with the next job, and a finished job is deleted at once
    done = submit(client, "suzanne", steps={"coarse": 1, "geometry": 1, "texture": 1})
    assert collect_until_final(client, done)[-1].body["state"] == "done"
    assert store.job_dir(done).exists()
    assert request(client, "delete_job", {"job_id": done}).type == "deleted"
    assert not store.job_dir(done).exists()
    assert store.events_after(done, 0) == []
    assert request(client, "get_result", {"job_id": done}).body["code"] == "unknown_job"


def test_reconnecting_client_gets_every_event_once_in_order(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.02, steps_per_stage=8))
    first = start.client(server.address)
    job_id = submit(first, "suzanne")
    seen = []
    while len(seen) < 6:
        msg = first.recv(2000)
        assert msg is not None
        if msg.type == "event":
            seen.append(msg)
    first.close()  # gone mid-job; the server keeps running the job
    time.sleep(0.1)
    second = start.client(server.address)
    assert request(second, "hello", HELLO).type == "welcome"
    subscribed = request(second, "subscribe", {"job_id": job_id, "after_seq": seen[-1].seq})
    assert subscribed.type == "subscribed"
    rest = collect_until_final(second, job_id)
    seqs = [e.seq for e in seen + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1].body["state"] == "done"
    # a second subscribe from 0 replays the whole stored log, identical
    request(second, "subscribe", {"job_id": job_id, "after_seq": 0})
    replay = collect_until_final(second, job_id)
    assert [(e.seq, e.body) for e in replay] == [(e.seq, e.body) for e in seen + rest]


def test_progress_reaches_subscriber_and_is_not_stored(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.01, steps_per_stage=3))
    client = start.client(server.address)
    job_id = submit(client, "suzanne")
    progress = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = client.recv(100)
        if msg is not None and msg.type == "progress":
            progress.append(msg)
        if msg is not None and msg.type == "event" and msg.body.get("state") == "done":
            break
    assert progress and all(p.seq is None and p.job_id == job_id for p in progress)
    assert set(progress[0].body) >= {"stage", "step", "steps", "eta_s", "losses"}
    stored = server.server.store.events_after(job_id, 0)
    assert all(e.type in ("state", "stage", "mesh") for e in stored)


def test_failing_runner_fails_only_its_job(start: Any) -> None:
    server = start(MeshRunner(steps_per_stage=2))
    client = start.client(server.address)
    failing = submit(client, "please fail")
    fine = submit(client, "suzanne")
    failed = collect_until_final(client, failing)[-1].body
    assert failed["state"] == "failed"
    assert failed["error"].startswith("RuntimeError: the mesh runner was asked to fail")
    assert "\n" not in failed["error"] and "Traceback" not in failed["error"]
    assert collect_until_final(client, fine)[-1].body["state"] == "done"


def test_job_failed_reason_reaches_the_artist_as_written(start: Any) -> None:
    server = start(MeshRunner(steps_per_stage=2))
    client = start.client(server.address)
    refused = submit(client, "please refuse")
    failed = collect_until_final(client, refused)[-1].body
    assert failed == {"event": "state", "state": "failed",
                      "error": "the mesh runner refuses the prompt 'please refuse'; change it"}


class _BrokenModelsRunner(MeshRunner):
    """A runner whose `models` attribute is broken: answering `hello` faults inside the server."""

    @property  # type: ignore[override]
    def models(self) -> dict[str, str]:
        raise KeyError("no models table")

    @models.setter
    def models(self, value: dict[str, str]) -> None:
        pass


def test_fault_in_a_handler_is_an_internal_error_and_the_server_goes_on(start: Any) -> None:
    server = start(_BrokenModelsRunner())
    client = start.client(server.address)
    reply = request(client, "hello", HELLO)
    assert reply.body["code"] == "internal" and "KeyError" in reply.body["message"]
    assert request(client, "ping").type == "pong"


def test_malformed_messages_never_stop_the_server(start: Any) -> None:
    server = start(MeshRunner())
    rng = np.random.default_rng(7)
    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    valid = encode(Message("ping"))
    try:
        for i in range(3000):
            # 1. random frames; some start with the right tag, some are a valid message cut or bent
            count = int(rng.integers(0, 6))
            frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(count)]
            if i % 3 == 0:
                frames = [TAG, *frames]
            if i % 5 == 0:
                frames = [bytes(f) for f in valid[: int(rng.integers(1, len(valid) + 1))]]
                if frames and i % 10 == 0:
                    frames[-1] = frames[-1][: len(frames[-1]) // 2]
            raw.send_multipart(frames or [b""])
        replies = 0
        while raw.poll(2000):
            raw.recv_multipart()
            replies += 1
        assert replies > 1000
    finally:
        raw.close()
        context.term()
    client = start.client(server.address)
    # well-formed messages with wrong fields get the right codes
    assert request(client, "subscribe", {"job_id": 5, "after_seq": 0}).body["field"] == "job_id"
    job_id = submit(client, "suzanne")
    bad_seq = request(client, "subscribe", {"job_id": job_id, "after_seq": -1}).body
    assert (bad_seq["code"], bad_seq["field"]) == ("bad_message", "after_seq")
    assert request(client, "welcome").body["code"] == "bad_message"
    assert request(client, "submit", {"kind": "generate", "params": [1, 2]}).body["code"] == "bad_params"
    assert request(client, "ping").type == "pong"


def _curve(tmp_path: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    server_dir = tmp_path / "server_keys"
    create_server_keys(server_dir)
    clients = {}
    for name in names:
        create_client_keys(tmp_path / name)
        clients[name] = tmp_path / name
    return server_dir, clients


def test_curve_refuses_unknown_keys_and_hides_other_keys_jobs(start: Any, tmp_path: Path) -> None:
    server_dir, clients = _curve(tmp_path, ("alice", "bob", "mallory"))
    for name in ("alice", "bob"):
        authorize(server_dir, clients[name] / "client.key")
    server = start(MeshRunner(), keys_dir=server_dir)
    server_key = load_public_key(server_dir / "server.key")
    alice, bob, mallory = (
        start.client(server.address, server_public_key=server_key, client_keys_dir=clients[name])
        for name in ("alice", "bob", "mallory")
    )
    with pytest.raises(TimeoutError):
        mallory.request(Message("ping"), timeout_s=2)
    job_id = submit(alice, "suzanne")
    assert collect_until_final(alice, job_id)[-1].body["state"] == "done"
    assert [j["job_id"] for j in request(alice, "list_jobs").body["jobs"]] == [job_id]
    assert request(bob, "list_jobs").body["jobs"] == []
    for type in ("get_result", "cancel", "delete_job", "unsubscribe"):
        assert request(bob, type, {"job_id": job_id}).body["code"] == "unknown_job", type
    assert request(bob, "subscribe", {"job_id": job_id, "after_seq": 0}).body["code"] == "unknown_job"
    assert request(alice, "get_result", {"job_id": job_id}).type == "result"


def test_unsubscribe_stops_events_and_subscribe_resumes_them(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.02, steps_per_stage=30))
    client = start.client(server.address)
    job_id = submit(client, "suzanne")
    wait_for(lambda: job_states(client)[job_id] == "running")
    assert request(client, "unsubscribe", {"job_id": job_id}).type == "unsubscribed"
    time.sleep(0.05)
    while client.recv(0) is not None:  # what was already on its way
        pass
    quiet_until = time.monotonic() + 0.3
    while time.monotonic() < quiet_until:
        msg = client.recv(50)
        assert msg is None or msg.job_id != job_id, msg
    last = request(client, "subscribe", {"job_id": job_id, "after_seq": 0}).body["last_seq"]
    events = collect_until_final(client, job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and len(events) > last


def test_serve_refuses_bad_flags_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from backend.__main__ import main

    assert main(["serve", "--store", str(tmp_path / "s"), "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--store", str(tmp_path / "s"), "--keys", str(tmp_path / "none")]) == 2
    assert f"--keys {tmp_path / 'none'} is not a folder" in capsys.readouterr().err

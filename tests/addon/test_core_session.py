"""The client session against the real server (mesh-streaming runner) over loopback TCP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from backend.server import Server, ServerConfig
from blender_addon.core.session import (
    ClientSession,
    ConnectionSettings,
    JobEvent,
    RequestDone,
    RequestFailed,
    SessionError,
)
from blender_addon.core.settings import JobSettings, generate_params
from tests.backend.mesh_runner import MeshRunner, ServerThread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(Server(ServerConfig(bind="tcp://127.0.0.1:*", store_dir=tmp_path / "store"), MeshRunner(step_delay_s=0.02)))
    yield thread
    thread.stop()


def pump_until(session: ClientSession, done, timeout_s: float = 20.0) -> list:
    """Poll until done(updates) is true; returns every update."""
    updates: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        updates.extend(session.poll())
        if done(updates):
            return updates
        time.sleep(0.01)
    raise TimeoutError(f"not done after {timeout_s} s: {updates!r}")


def submit(session: ClientSession, prompt: str = "a spot cow", steps: dict | None = None) -> tuple[str, list]:
    """Submit a generate job; returns its id and the updates polled so far."""
    params = generate_params(JobSettings(prompt=prompt, steps=steps or {"coarse": 2, "geometry": 1, "texture": 1}))
    session.submit("generate", params, {})
    done = pump_until(session, lambda u: any(isinstance(x, RequestDone) and x.request_type == "submit" for x in u))
    return next(x.reply.body["job_id"] for x in done if isinstance(x, RequestDone) and x.request_type == "submit"), done


def test_generate_events_arrive_once_in_order(server: ServerThread):
    session = ClientSession(ConnectionSettings(address=server.address))
    try:
        session.hello()
        job_id, updates = submit(session)
        updates += pump_until(session, lambda u: session.jobs[job_id].finished)
        events = [u for u in updates if isinstance(u, JobEvent)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        meshes = [e for e in events if e.message.body["event"] == "mesh"]
        assert len(meshes) == 2 + 1 + 1 + 1  # one per step, then the final one
        assert meshes[-1].message.body["final"] is True
        assert session.jobs[job_id].state == "done"
        assert session.welcome["device"] == "cpu"
        assert not session.busy
    finally:
        session.close()


def test_a_new_session_catches_up_from_its_last_seq(server: ServerThread):
    first = ClientSession(ConnectionSettings(address=server.address))
    job_id, seen = submit(first)
    seen += pump_until(first, lambda u: first.jobs[job_id].last_seq >= 3)
    applied = first.jobs[job_id].last_seq
    first.close()
    assert applied >= 3 and len([u for u in seen if isinstance(u, JobEvent)]) == applied

    second = ClientSession(ConnectionSettings(address=server.address))
    try:
        second.hello()
        second.follow(job_id, after_seq=applied)
        updates = pump_until(second, lambda u: second.jobs[job_id].finished)
        seqs = [u.seq for u in updates if isinstance(u, JobEvent)]
        assert seqs == list(range(applied + 1, applied + 1 + len(seqs)))  # no repeats, no gaps
    finally:
        second.close()


def test_cancel_ends_the_job_cancelled(tmp_path: Path):
    thread = ServerThread(Server(ServerConfig(bind="tcp://127.0.0.1:*", store_dir=tmp_path / "s"), MeshRunner(step_delay_s=0.2)))
    session = ClientSession(ConnectionSettings(address=thread.address))
    try:
        job_id, _ = submit(session, steps={"coarse": 50})
        session.cancel(job_id)
        pump_until(session, lambda u: session.jobs[job_id].finished)
        assert session.jobs[job_id].state == "cancelled"
    finally:
        session.close()
        thread.stop()


def test_server_error_comes_back_with_its_field(server: ServerThread):
    session = ClientSession(ConnectionSettings(address=server.address))
    try:
        params = generate_params(JobSettings(prompt="a cow"))
        params["texture_size"] = 300
        session.submit("generate", params, {})
        updates = pump_until(session, lambda u: any(isinstance(x, RequestFailed) for x in u))
        failure = next(x for x in updates if isinstance(x, RequestFailed))
        assert failure.code == "bad_params" and failure.field == "params.texture_size"
    finally:
        session.close()


def test_unreachable_backend_fails_within_the_timeout():
    session = ClientSession(ConnectionSettings(address="tcp://127.0.0.1:9"))
    try:
        start = time.monotonic()
        session.hello(timeout_s=1.0)
        updates = pump_until(session, lambda u: any(isinstance(x, RequestFailed) for x in u), timeout_s=5)
        failure = next(x for x in updates if isinstance(x, RequestFailed))
        assert time.monotonic() - start < 3.0
        assert failure.code == "timeout" and "tcp://127.0.0.1:9" in failure.message
        assert failure.field == "backend_address"
    finally:
        session.close()


def test_malformed_address_names_the_preference():
    with pytest.raises(SessionError) as info:
        ClientSession(ConnectionSettings(address="localhost:5555"))
    assert info.value.field == "backend_address" and "localhost:5555" in str(info.value)


def test_curve_keys_authorised_client_is_welcomed_and_a_stranger_is_not(tmp_path: Path):
    from protocol.keys import authorize, create_client_keys, create_server_keys, load_public_key

    server_dir, friend, stranger = tmp_path / "server", tmp_path / "friend", tmp_path / "stranger"
    create_server_keys(server_dir)
    create_client_keys(friend)
    create_client_keys(stranger)
    authorize(server_dir, friend / "client.key")
    server_key = load_public_key(server_dir / "server.key").decode()
    config = ServerConfig(bind="tcp://127.0.0.1:*", store_dir=tmp_path / "store", keys_dir=server_dir)
    thread = ServerThread(Server(config, MeshRunner()))
    sessions = [
        ClientSession(ConnectionSettings(address=thread.address, server_public_key=server_key, client_keys_dir=str(keys)))
        for keys in (friend, stranger)
    ]
    try:
        for session in sessions:
            session.hello(timeout_s=2.0)
        welcomed = pump_until(sessions[0], lambda u: sessions[0].welcome is not None, timeout_s=10)
        assert not [u for u in welcomed if isinstance(u, RequestFailed)]
        refused = pump_until(sessions[1], lambda u: any(isinstance(x, RequestFailed) for x in u), timeout_s=10)
        assert refused[0].code == "timeout" and sessions[1].welcome is None
        assert "refused this client's key" in refused[0].message
    finally:
        for session in sessions:
            session.close()
        thread.stop()


def test_half_a_key_setup_names_the_missing_preference():
    with pytest.raises(SessionError) as info:
        ClientSession(ConnectionSettings(address="tcp://127.0.0.1:5555", server_public_key="x" * 40))
    assert info.value.field == "client_keys_dir"


def test_heartbeat_tells_a_backend_that_stopped_answering(tmp_path: Path):
    from blender_addon.core.session import HEARTBEAT_MISSES, HEARTBEAT_S
    from tests.backend.mesh_runner import start_server_process

    server = start_server_process(tmp_path / "store", tmp_path / "server.log", "--step-delay", "0.05")
    session = ClientSession(ConnectionSettings(address=server.address))
    try:
        session.hello()
        job_id, _ = submit(session, steps={"coarse": 400})
        pump_until(session, lambda u: session.jobs[job_id].last_seq >= 3)
        server.kill()
        killed_at = time.monotonic()
        updates = pump_until(session, lambda u: any(isinstance(x, RequestFailed) for x in u), timeout_s=30)
        failed = next(x for x in updates if isinstance(x, RequestFailed))
        assert failed.code == "timeout" and failed.context.get("heartbeat")
        assert time.monotonic() - killed_at <= HEARTBEAT_S * (HEARTBEAT_MISSES + 1) + 1.0
    finally:
        session.close()
        server.kill()


def test_a_backend_restarted_between_heartbeats_is_subscribed_again(tmp_path: Path):
    """Killed and restarted on the same address and store before a heartbeat is missed: the new
    server knows nothing of the subscription; the heartbeats show it ahead and the session
    subscribes again from its last received seq, without duplicates."""
    from tests.backend.mesh_runner import start_server_process

    server = start_server_process(tmp_path / "store", tmp_path / "server1.log", "--step-delay", "0.02")
    session = ClientSession(ConnectionSettings(address=server.address))
    try:
        session.hello()
        job_id, updates = submit(session, steps={"coarse": 150})
        updates += pump_until(session, lambda u: session.jobs[job_id].last_seq >= 3)
        server.kill()
        server = start_server_process(tmp_path / "store", tmp_path / "server2.log", "--step-delay", "0.02",
                                      bind=server.address)
        updates += pump_until(session, lambda u: session.jobs[job_id].finished, timeout_s=60)
        seqs = [u.seq for u in updates if isinstance(u, JobEvent)]
        assert seqs == list(range(1, len(seqs) + 1))  # every event once, in order
        assert session.jobs[job_id].state == "done"
        assert not [u for u in updates if isinstance(u, RequestFailed)]
    finally:
        session.close()
        server.kill()


def test_the_job_list_comes_whole_across_pages(tmp_path: Path):
    from backend.server import JOBS_PAGE
    from backend.store import JobStore

    store = JobStore(tmp_path / "store")
    created = [store.create_job(owner="", kind="generate", prompt=f"job {n}", params={}, inputs={})[0].job_id
               for n in range(JOBS_PAGE + 30)]
    store.close()
    thread = ServerThread(Server(ServerConfig(bind="tcp://127.0.0.1:*", store_dir=tmp_path / "store"),
                                 MeshRunner(step_delay_s=0.02)))
    session = ClientSession(ConnectionSettings(address=thread.address))
    try:
        session.hello()
        session.list_jobs()
        done = pump_until(session, lambda u: any(isinstance(x, RequestDone) and x.request_type == "list_jobs" for x in u))
        assert sum(isinstance(x, RequestDone) and x.request_type == "list_jobs" for x in done) == 1
        assert [j["job_id"] for j in session.server_jobs] == created
    finally:
        session.close()
        thread.stop()

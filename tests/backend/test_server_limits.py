"""Limits and guarantees (docs/server.md): what a client sends cannot end the server or make it keep
unbounded state. A server thread on loopback TCP, real clients and raw ZeroMQ sockets."""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from backend.logging_setup import configure_logging
from backend.server import JOBS_REPLY_BYTES, MAX_SUBSCRIPTIONS_PER_PEER
from backend.stages.inputs import decode_png_rgb
from backend.store import JobStore
from protocol.codec import MAX_STRING_CHARS, ProtocolError, encode
from protocol.keys import authorize, create_client_keys, create_server_keys, load_public_key
from protocol.messages import Message, new_msg_id
from protocol.params import validate_submit
from tests.backend.mesh_runner import MeshRunner, collect_until_final
from tests.backend.test_server import HELLO, request, start, submit, wait_for  # noqa: F401 (fixture)

LONG = "x" * MAX_STRING_CHARS
"""The longest string the decoder accepts: every echo of it must still fit in a reply."""


class RawClient:
    """A DEALER that sends frames as they are and reads the replies."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def exchange(self, frames: list[bytes]) -> dict:
        """Send `frames`; the body of the reply (within 5 s)."""
        self.socket.send_multipart(frames)
        assert self.socket.poll(5000), "no reply"
        reply = self.socket.recv_multipart()
        return msgpack.unpackb(reply[2])

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def frames_of(msg: Message, header: dict | None = None, body: dict | None = None) -> list[bytes]:
    """`msg` encoded, with header fields and body replaced as given (no checks on them)."""
    frames = [bytes(f) for f in encode(msg)]
    if header:
        frames[1] = msgpack.packb({**msgpack.unpackb(frames[1]), **header})
    if body is not None:
        frames[2] = msgpack.packb(body)
    return frames


# Row 1: one message killed the server ----------------------------------------------------------


def test_near_limit_values_and_extreme_shapes_get_an_error_and_the_server_goes_on(start: Any) -> None:
    server = start(MeshRunner())
    raw = RawClient(server.address)
    try:
        crafted = [
            frames_of(Message("cancel", {"job_id": LONG})),
            frames_of(Message("subscribe", {"job_id": LONG, "after_seq": 0})),
            frames_of(Message("get_result"), header={"job_id": LONG}),
            frames_of(Message("ping"), header={"type": LONG}),
            frames_of(Message("ping"), header={"msg_id": LONG}),
            frames_of(Message("submit", {"kind": LONG, "params": {"prompt": "a cup"}})),
            frames_of(Message("submit", {"kind": "generate", "params": {"prompt": "a cup", "quality": LONG}})),
            frames_of(Message("hello", {**HELLO, "protocol": LONG})),
            frames_of(Message("list_jobs", {"cursor": LONG})),
            frames_of(Message("submit", {"kind": "generate", "params": {"prompt": "a", "request_id": 1},
                                         "request_id": LONG})),
        ]
        empty = frames_of(Message("ping", buffers={"b": b""}))
        header = msgpack.unpackb(empty[1])
        header["buffers"][0].update(dtype="u1", shape=[0, 2**63])
        crafted.append([empty[0], msgpack.packb(header), empty[2], b""])
        for frames in crafted:
            body = raw.exchange(frames)
            assert body["code"] in ("bad_message", "bad_params", "unsupported_protocol", "unknown_job"), body
            assert len(body["message"]) <= 1000
        # Random near-limit strings in every header and body field.
        rng = np.random.default_rng(15)
        fields = ["job_id", "kind", "prompt", "quality", "client_name", "protocol", "cursor"]
        for _ in range(30):
            size = int(rng.integers(MAX_STRING_CHARS - 64, MAX_STRING_CHARS + 1))
            text = "".join(rng.choice(list("aé中\n\x00"), size))
            type = str(rng.choice(["hello", "submit", "cancel", "subscribe", "list_jobs", "get_result"]))
            body = {str(rng.choice(fields)): text, "params": {str(rng.choice(fields)): text}}
            reply = raw.exchange(frames_of(Message(type), body=body))
            assert "code" in reply or type == "list_jobs", reply
    finally:
        raw.close()
    client = start.client(server.address)
    assert request(client, "ping").type == "pong"


# Row 2: the job list passed the reply limit ----------------------------------------------------


def test_jobs_come_in_pages_under_the_reply_limit(start: Any, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    prompt = "中" * 1000  # the longest prompt, 3 bytes a character
    made = []
    for _ in range(300):
        record, _ = store.create_job(owner="", kind="generate", prompt=prompt, params={"prompt": prompt}, inputs={})
        store.append_event(record.job_id, {"event": "state", "state": "cancelled"}, state="cancelled")
        made.append(record.job_id)
    store.close()
    server = start(MeshRunner(), store_dir=tmp_path / "store")
    client = start.client(server.address)
    listed, cursor, pages = [], None, 0
    while True:
        reply = request(client, "list_jobs", {"cursor": cursor, "limit": 1000})
        assert reply.type == "jobs", reply.body
        assert len(msgpack.packb(reply.body)) <= JOBS_REPLY_BYTES + 4096
        listed += [job["job_id"] for job in reply.body["jobs"]]
        cursor, pages = reply.body["next_cursor"], pages + 1
        if cursor is None:
            break
    assert listed == made and pages > 1
    assert [j["job_id"] for j in request(client, "list_jobs", {"limit": 5}).body["jobs"]] == made[:5]
    bad = request(client, "list_jobs", {"limit": 0}).body
    assert (bad["code"], bad["field"]) == ("bad_message", "limit")


# Row 6: a client that never reads pinned up to 1,000 events -----------------------------------


def test_a_subscriber_that_does_not_read_is_bounded_then_caught_up(start: Any) -> None:
    server = start(MeshRunner(steps_per_stage=30))
    raw = RawClient(server.address)
    try:
        raw.socket.setsockopt(zmq.RCVHWM, 1)
        body = raw.exchange(frames_of(Message("submit", {"kind": "generate", "params": {"prompt": "spot"}})))
        job_id = body["job_id"]
        # 0.1 MiB per mesh event: the server's queue for this client fills, it stops queueing.
        wait_for(lambda: any(s.failing_since is not None for s in list(server.server._subs.values())), 30)
        wait_for(lambda: server.server.store.get_job(job_id).state == "done", 60)
        last_seq = server.server.store.get_job(job_id).last_seq

        def read_events() -> list[int]:
            seqs = []
            while raw.socket.poll(1000):
                header = msgpack.unpackb(raw.socket.recv_multipart()[1])
                if header["type"] == "event":
                    seqs.append(header["seq"])
            return seqs

        seqs = read_events()
        assert seqs == list(range(1, len(seqs) + 1))
        # Caught up from the store (subscribing again from the last seq it has, if dropped).
        raw.socket.send_multipart(frames_of(Message("subscribe", {"job_id": job_id, "after_seq": seqs[-1]})))
        seqs += read_events()
        assert seqs == list(range(1, last_seq + 1))
    finally:
        raw.close()


# Row 7: the queue limit, unknown buffers, quotas, retention, checkpoints, subscriptions -------


def test_submit_then_cancel_counts_against_the_queue(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=0.5, steps_per_stage=20), max_queue=4)
    client = start.client(server.address)
    submit(client)  # runs
    refused = None
    for attempt in range(10):
        reply = request(client, "submit", {"kind": "generate", "params": {"prompt": "suzanne"}})
        if reply.type == "error":
            refused = attempt
            assert reply.body["code"] == "queue_full" and "cancelled" in reply.body["message"]
            break
        assert request(client, "cancel", {"job_id": reply.body["job_id"]}).type == "cancelled"
    assert refused is not None and refused <= 4


def test_unknown_buffers_are_refused_by_name(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": "a cup"}},
                    {"junk": np.zeros(1024, np.uint8)})
    assert (reply.body["code"], reply.body["field"]) == ("bad_params", "buffers.junk")
    assert request(client, "list_jobs").body["jobs"] == []


def test_per_key_quota_of_jobs_and_bytes(start: Any) -> None:
    server = start(MeshRunner(), max_jobs_per_key=2, max_bytes_per_key=10**9)
    client = start.client(server.address)
    for _ in range(2):
        collect_until_final(client, submit(client))
    full = request(client, "submit", {"kind": "generate", "params": {"prompt": "suzanne"}}).body
    assert full["code"] == "queue_full" and "--max-jobs-per-key" in full["message"]
    small = start(MeshRunner(), max_bytes_per_key=1000)
    other = start.client(small.address)
    collect_until_final(other, submit(other))  # the event buffers pass 1000 bytes
    over = request(other, "submit", {"kind": "generate", "params": {"prompt": "suzanne"}}).body
    assert over["code"] == "queue_full" and "--max-bytes-per-key" in over["message"]


def test_retention_removes_old_finished_jobs_and_checkpoints_go_when_a_job_ends(start: Any, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    old, _ = store.create_job(owner="", kind="generate", prompt="a cup", params={"prompt": "a cup"}, inputs={})
    store.append_event(old.job_id, {"event": "state", "state": "cancelled"}, state="cancelled")
    store._db.execute("UPDATE jobs SET ended_at = ? WHERE job_id = ?", (time.time() - 3 * 86400, old.job_id))
    store.close()
    server = start(MeshRunner(), store_dir=tmp_path / "store", keep_days=2)
    client = start.client(server.address)
    wait_for(lambda: not server.server.store.job_dir(old.job_id).exists())
    job_id = submit(client)
    assert collect_until_final(client, job_id)[-1].body["state"] == "done"
    assert [j["job_id"] for j in request(client, "list_jobs").body["jobs"]] == [job_id]
    assert not (server.server.store.job_dir(job_id) / "checkpoint.bin").exists()
    assert server.server.store.load_result(job_id) is not None


def test_subscriptions_per_connection_are_capped(start: Any) -> None:
    server = start(MeshRunner(step_delay_s=1.0, steps_per_stage=30), max_queue=200)
    client = start.client(server.address)
    jobs = [submit(client) for _ in range(MAX_SUBSCRIPTIONS_PER_PEER + 20)]
    for job_id in jobs:
        assert request(client, "subscribe", {"job_id": job_id, "after_seq": 1}).type == "subscribed"
    assert len(server.server._subs) == MAX_SUBSCRIPTIONS_PER_PEER


# Row 8: secret keys were world-readable for a moment -------------------------------------------


def test_secret_keys_are_never_readable_by_others(tmp_path: Path) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in tmp_path.rglob("*key_secret*"):
                try:
                    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                        seen.append(str(path))
                except FileNotFoundError:
                    pass

    old_umask = os.umask(0o022)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for index in range(40):
            create_client_keys(tmp_path / f"c{index}")
            create_server_keys(tmp_path / f"s{index}")
    finally:
        stop.set()
        watcher.join()
        os.umask(old_umask)
    assert seen == []
    assert stat.S_IMODE((tmp_path / "c0" / "client.key_secret").stat().st_mode) == 0o600
    assert not list(tmp_path.rglob("*.tmp"))


# Row 9: a second IHDR slipped past the image limit ---------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, second_ihdr: tuple[int, int] | None = None) -> bytes:
    def ihdr(w: int, h: int) -> bytes:
        return _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    extra = ihdr(*second_ihdr) if second_ihdr else b""
    return b"\x89PNG\r\n\x1a\n" + ihdr(width, height) + extra + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_second_ihdr_is_refused_at_submit_and_by_the_decoder(start: Any) -> None:
    tricked = _png(8, 8, second_ihdr=(13000, 13000))
    with pytest.raises(ProtocolError, match="second IHDR") as caught:
        validate_submit("generate", {"prompt": "a cup"}, {"image": tricked})
    assert caught.value.field == "buffers.image"
    with pytest.raises(ValueError, match="at most 4096 per side"):
        decode_png_rgb(tricked, "buffers.image")
    assert decode_png_rgb(_png(8, 8), "buffers.image").shape == (8, 8, 3)
    server = start(MeshRunner())
    client = start.client(server.address)
    reply = request(client, "submit", {"kind": "generate", "params": {"prompt": "a cup"}}, {"image": tricked})
    assert (reply.body["code"], reply.body["field"]) == ("bad_params", "buffers.image")


# Row 11: a removed key kept working ------------------------------------------------------------


def test_keys_reload_while_serving(start: Any, tmp_path: Path) -> None:
    server_dir = tmp_path / "server_keys"
    create_server_keys(server_dir)
    for name in ("alice", "bob"):
        create_client_keys(tmp_path / name)
    alice_file = authorize(server_dir, tmp_path / "alice" / "client.key")
    server = start(MeshRunner(), keys_dir=server_dir)
    server_key = load_public_key(server_dir / "server.key")
    alice = start.client(server.address, server_public_key=server_key, client_keys_dir=tmp_path / "alice")
    assert request(alice, "ping").type == "pong"
    # A key removed: refused from the next request on, without a restart.
    alice_file.unlink()
    wait_for(lambda: request(alice, "ping").type == "error", 5)
    assert request(alice, "ping").body["code"] == "unauthorized"
    # A key added: let in without a restart (and on demand, as SIGHUP does).
    authorize(server_dir, tmp_path / "bob" / "client.key")
    server.server.reload_keys()
    time.sleep(0.5)
    bob = start.client(server.address, server_public_key=server_key, client_keys_dir=tmp_path / "bob")
    assert request(bob, "ping").type == "pong"


# Rows 12 and 13: permissions, forged log lines -------------------------------------------------


def test_store_and_log_are_private_and_log_lines_cannot_be_forged(start: Any, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    logger = logging.getLogger("dreamloom")
    saved = list(logger.handlers), logger.propagate
    configure_logging(store_dir)
    try:
        server = start(MeshRunner(), store_dir=store_dir)
        client = start.client(server.address)
        forged = "tests\n2026-01-01 00:00:00,000 INFO dreamloom.server: job 0 deleted\x1b[2K"
        assert request(client, "hello", {**HELLO, "client_name": forged}).type == "welcome"
        job_id = submit(client)
        collect_until_final(client, job_id)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.propagate = saved[1]
    lines = (store_dir / "server.log").read_text().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert any("tests\\n2026-01-01" in line and "\\x1b" in line for line in lines)
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    for path in [store_dir / "server.log", store_dir / "jobs.sqlite3", *server.server.store.job_dir(job_id).rglob("*")]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


# Row 14: a retried submit made two jobs --------------------------------------------------------


def test_a_retried_submit_with_its_request_id_returns_the_same_job(start: Any) -> None:
    server = start(MeshRunner())
    client = start.client(server.address)
    body = {"kind": "generate", "params": {"prompt": "suzanne"}, "request_id": "blender-7f3a:1"}
    first = request(client, "submit", body)
    again = request(client, "submit", body)
    assert first.type == again.type == "accepted"
    assert first.body["job_id"] == again.body["job_id"]
    events = collect_until_final(client, first.body["job_id"])
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # each event once
    other = request(client, "submit", {**body, "request_id": "blender-7f3a:2"})
    assert other.body["job_id"] != first.body["job_id"]
    assert len(request(client, "list_jobs").body["jobs"]) == 2
    bad = request(client, "submit", {**body, "request_id": "has space"}).body
    assert (bad["code"], bad["field"]) == ("bad_message", "request_id")


def test_fuzzed_request_ids_and_msg_ids_never_stop_the_server(start: Any) -> None:
    server = start(MeshRunner())
    raw = RawClient(server.address)
    try:
        for value in ("", "\n", LONG, "a" * 65, "é"):
            reply = raw.exchange(frames_of(Message("submit", {"kind": "generate", "params": {"prompt": "x"},
                                                              "request_id": value})))
            assert reply["field"] == "request_id"
        reply = raw.exchange(frames_of(Message("ping"), header={"reply_to": new_msg_id() + "0"}))
        assert reply["code"] == "bad_message"
    finally:
        raw.close()
    assert request(start.client(server.address), "ping").type == "pong"

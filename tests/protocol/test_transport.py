"""Real ROUTER/DEALER sockets over TCP loopback: round trips, request/recv, errors, gone peers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import REPLY_FOR, Message, reply_to
from protocol.transport import ClientSocket, Incoming, ServerSocket, is_loopback

from .samples import assert_same_message, sample_messages

LOOPBACK = "tcp://127.0.0.1:0"


@pytest.fixture()
def server() -> Iterator[ServerSocket]:
    sock = ServerSocket(LOOPBACK, heartbeat_ms=500)
    yield sock
    sock.close()


@pytest.fixture()
def client(server: ServerSocket) -> Iterator[ClientSocket]:
    sock = ClientSocket(server.bound_address, heartbeat_ms=500)
    yield sock
    sock.close()


class ServerThread:
    """Serves `handle(incoming) -> list of messages to send back` until stopped."""

    def __init__(self, server: ServerSocket, handle: Callable[[Incoming], list[Message]]) -> None:
        self.server, self.handle = server, handle
        self.received: list[Incoming] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            incoming = self.server.recv(20)
            if incoming is None:
                continue
            self.received.append(incoming)
            for message in self.handle(incoming):
                self.server.send(incoming.peer, message)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bound_address_resolves_port_zero(server: ServerSocket) -> None:
    assert server.bound_address.startswith("tcp://127.0.0.1:")
    assert int(server.bound_address.rsplit(":", 1)[1]) > 0


def test_every_message_type_round_trips_both_ways(server: ServerSocket, client: ClientSocket) -> None:
    for message in sample_messages(np.random.default_rng(5)):
        client.send(message)
        incoming = server.recv(5000)
        assert incoming is not None and incoming.error is None and incoming.client_key is None
        assert_same_message(incoming.message, message)
        assert server.send(incoming.peer, message)
        echoed = client.recv(5000)
        assert echoed is not None
        assert_same_message(echoed, message)
    assert server.recv(0) is None and client.recv(0) is None


def test_large_buffers_cross_intact(server: ServerSocket, client: ClientSocket) -> None:
    positions_nx3 = np.random.default_rng(0).standard_normal((1_000_000, 3)).astype(np.float32)  # 12 MB
    message = Message("event", {"event": "mesh"}, {"positions": positions_nx3, "png": bytes(3_000_000)}, job_id="j", seq=1)
    client.send(message)
    incoming = server.recv(10_000)
    assert incoming is not None and incoming.message is not None
    assert_same_message(incoming.message, message)
    assert not incoming.message.buffers["positions"].flags.writeable


def test_request_waits_for_its_reply_and_keeps_the_rest(server: ServerSocket, client: ClientSocket) -> None:
    def handle(incoming: Incoming) -> list[Message]:
        request = incoming.message
        return [
            Message("event", {"event": "state", "state": "running"}, job_id="j", seq=1),
            Message("progress", {"stage": "coarse", "step": 1, "steps": 2, "eta_s": None, "losses": {}}, job_id="j"),
            reply_to(request, REPLY_FOR[request.type]),
        ]

    with ServerThread(server, handle):
        reply = client.request(Message("ping"), timeout_s=5)
        assert reply.type == "pong"
        kept = [client.recv(1000), client.recv(1000)]
        assert [m.type for m in kept] == ["event", "progress"]
        assert client.recv(100) is None
        second = Message("list_jobs")
        assert client.request(second, timeout_s=5).reply_to == second.msg_id
        assert [client.recv(1000).type, client.recv(1000).type] == ["event", "progress"]


def test_unreachable_backend_fails_with_a_clear_message() -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    with ClientSocket(address) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            client.request(Message("hello", {"protocol": 1}), timeout_s=0.5)
        assert time.monotonic() - start < 2.0
    text = str(info.value)
    assert address in text and "0.5s" in text and "hello" in text and "refused" in text


def test_undecodable_frames_get_an_error_reply(server: ServerSocket) -> None:
    raw = server.context.socket(zmq.DEALER)
    raw.connect(server.bound_address)
    try:
        # 1. A foreign tag.
        raw.send_multipart([b"HTTP/1.1", b"", b""])
        incoming = server.recv(5000)
        assert incoming.message is None and incoming.error.code == "unsupported_protocol"
        assert server.send(incoming.peer, incoming.error.to_message())
        assert raw.poll(5000)
        reply = decode(raw.recv_multipart())
        assert reply.type == "error" and reply.body["code"] == "unsupported_protocol"
        # 2. A readable header with a bad field: the error answers that request.
        frames = encode(Message("ping"))
        good = decode(frames)
        frames[2] = b"\x81\x01\x02"  # body {1: 2}
        raw.send_multipart(frames)
        incoming = server.recv(5000)
        assert incoming.error.code == "bad_message" and incoming.error.reply_to == good.msg_id
    finally:
        raw.close(linger=0)


def test_send_to_an_unknown_or_vanished_peer_returns_false(server: ServerSocket) -> None:
    assert server.send(b"\x00no-such-peer", Message("pong")) is False
    client = ClientSocket(server.bound_address)
    client.send(Message("ping"))
    incoming = server.recv(5000)
    assert server.send(incoming.peer, Message("pong")) is True
    client.close()
    deadline = time.monotonic() + 5
    while server.send(incoming.peer, Message("pong")):
        assert time.monotonic() < deadline, "the server still routes to a closed client"
        time.sleep(0.02)


def test_send_to_a_full_peer_returns_false() -> None:
    with ServerSocket(LOOPBACK, send_hwm=2) as server:
        slow = server.context.socket(zmq.DEALER)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.connect(server.bound_address)
        try:
            slow.send_multipart(encode(Message("ping")))
            incoming = server.recv(5000)
            big = Message("progress", {"step": 1}, {"preview": bytes(2**20)}, job_id="j")
            results = [server.send(incoming.peer, big) for _ in range(200)]
            assert results[0] is True and results[-1] is False  # never raises, reports the full queue
        finally:
            slow.close(linger=0)


def test_oversized_messages_are_dropped_and_the_server_goes_on() -> None:
    with ServerSocket(LOOPBACK, max_message_bytes=100_000) as server:
        assert server.socket.getsockopt(zmq.MAXMSGSIZE) == 100_000
        with ClientSocket(server.bound_address) as client:
            client.send(Message("event", buffers={"big": bytes(200_000)}, seq=1))
            assert server.recv(500) is None  # the transport dropped it
        with ClientSocket(server.bound_address) as client:
            # Each frame fits the transport limit, the whole message does not: decode refuses it.
            client.send(Message("event", buffers={"a": bytes(60_000), "b": bytes(60_000)}, seq=1))
            incoming = server.recv(5000)
            assert incoming.error.code == "bad_message" and "at most 100000" in incoming.error.message
            client.send(Message("ping"))
            assert server.recv(5000).message.type == "ping"


def test_socket_options(server: ServerSocket, client: ClientSocket) -> None:
    for sock in (server.socket, client.socket):
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 500
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 1500
        assert sock.getsockopt(zmq.LINGER) == 250
    assert client.socket.getsockopt(zmq.HEARTBEAT_TTL) == 1500
    poller = zmq.Poller()
    poller.register(server.socket, zmq.POLLIN)
    client.send(Message("ping"))
    assert dict(poller.poll(5000)).get(server.socket) == zmq.POLLIN
    assert server.fileno() > 0


def test_a_non_loopback_bind_needs_keys_or_allow_insecure() -> None:
    with pytest.raises(ValueError, match="allow_insecure"):
        ServerSocket("tcp://0.0.0.0:0")
    with ServerSocket("tcp://0.0.0.0:0", allow_insecure=True) as server:
        assert server.bound_address.startswith("tcp://0.0.0.0:")
    with pytest.raises(ValueError, match="heartbeat_ms"):
        ServerSocket(LOOPBACK, heartbeat_ms=0)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.1.2.3:1", True), ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True), ("ipc:///tmp/dreamloom.sock", True), ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.4:5555", False),
        ("tcp://[::]:5555", False), ("tcp://eth0:5555", False), ("ws://127.0.0.1:1", False),
        ("127.0.0.1:5555", False), ("", False),
    ],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


def test_client_closes_quickly_with_unsent_messages() -> None:
    client = ClientSocket(f"tcp://127.0.0.1:{free_tcp_port()}")
    for _ in range(10):
        client.send(Message("ping"))
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 2.0


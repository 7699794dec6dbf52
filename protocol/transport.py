"""ZeroMQ sockets for both ends (PROTOCOL.md sections 1 and 7).

`ServerSocket` is the backend's ROUTER: `ROUTER_MANDATORY`, non-blocking sends that report a gone
or full peer as False, transport heartbeats, short linger, `MAXMSGSIZE`, a short send queue per
client, a cap on open connections, and CurveZMQ with a ZAP authenticator over a folder of
authorised client keys that can be reloaded while serving. `ClientSocket` is the add-on's DEALER, with
`request` waiting for one reply while keeping every other message for `recv`.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from .codec import ProtocolError, decode, encode
from .keys import authorized_dir, load_client_keys, load_server_keys
from .messages import DEFAULT_HEARTBEAT_MS, DEFAULT_MAX_MESSAGE_BYTES, Message

LINGER_MS = 250
"""How long `close` waits for queued outgoing messages."""
HEARTBEAT_TIMEOUT_FACTOR = 3
"""A peer silent for this many heartbeat intervals is dropped."""
DEFAULT_SEND_HWM = 32
"""Messages the server queues per client before `send` reports the client as full: a client that
does not read pins at most this many messages in server memory (the server catches it up from
its store once it reads again)."""
DEFAULT_MAX_CONNECTIONS = 768
"""Open TCP connections the server keeps (see `ServerSocket.police_connections`)."""
HANDSHAKE_MS = 5000
"""A connection that has not finished its ZMTP (and CURVE) handshake by then is closed."""


def is_loopback(bind: str) -> bool:
    """True for endpoints no other machine can reach: tcp on 127.x, localhost or [::1]; ipc; inproc."""
    scheme, sep, rest = bind.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(";", 1)[-1].rpartition(":")[0]
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _common_options(sock: zmq.Socket, heartbeat_ms: int, max_message_bytes: int) -> None:
    if heartbeat_ms < 1:
        raise ValueError(f"heartbeat_ms must be >= 1, got {heartbeat_ms}")
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_FACTOR * heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_FACTOR * heartbeat_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)


@dataclass
class Incoming:
    """One message received by the server, or the protocol error it raised."""

    peer: bytes
    """ROUTER routing id of the sender; pass it back to `ServerSocket.send`."""
    client_key: str | None
    """The sender's z85 CURVE public key (ZAP `User-Id`); None on a server without keys."""
    message: Message | None
    """The decoded message, or None when `error` is set."""
    error: ProtocolError | None
    """Why the frames could not be decoded; send `error.to_message()` back to `peer`."""


class ServerSocket:
    """The backend's ROUTER socket."""

    def __init__(
        self,
        bind: str,
        keys_dir: Path | None = None,
        *,
        context: zmq.Context | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        allow_insecure: bool = False,
        send_hwm: int = DEFAULT_SEND_HWM,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        """Bind `bind`. A non-loopback bind needs `keys_dir` (CurveZMQ) or `allow_insecure=True`.

        `send_hwm` is the number of messages queued per client before `send` returns False;
        `max_connections` the open connections kept (see `police_connections`).
        """
        if keys_dir is None and not is_loopback(bind) and not allow_insecure:
            raise ValueError(
                f"bind {bind!r} is reachable from other machines and no keys_dir was given: "
                "make keys with `python -m protocol.keys server DIR` or pass allow_insecure=True"
            )
        self.max_message_bytes = max_message_bytes
        self.heartbeat_ms = heartbeat_ms
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.authorized: frozenset[str] = frozenset()
        """z85 public keys of the authorised clients as last (re)loaded; empty without keys."""
        self.max_connections = max_connections
        self._connections: set[int] = set()
        """Descriptors of the connections kept."""
        self.refused_connections = 0
        """Connections closed at once because `max_connections` were open."""
        # 1. Socket options, and a monitor that reports each accepted and closed connection.
        self.socket = self.context.socket(zmq.ROUTER)
        self.monitor: zmq.Socket | None = None
        try:
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.socket.setsockopt(zmq.SNDHWM, send_hwm)
            self.socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            _common_options(self.socket, heartbeat_ms, max_message_bytes)
            self.monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            # 2. CurveZMQ: our key pair, and a ZAP handler that admits the authorised keys only.
            if self.keys_dir is not None:
                public, secret = load_server_keys(self.keys_dir)
                clients = authorized_dir(self.keys_dir)
                if not clients.is_dir():
                    raise FileNotFoundError(f"{clients} is missing; run `python -m protocol.keys server {self.keys_dir}`")
                self._auth = zmq.auth.thread.ThreadAuthenticator(self.context)
                self._auth.start()
                self.reload_authorized()
                self.socket.curve_secretkey = secret
                self.socket.curve_publickey = public
                self.socket.curve_server = True
            # 3. Bind and learn the real endpoint (port 0 picks a free one).
            self.socket.bind(bind)
            self.bound_address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise

    def reload_authorized(self) -> None:
        """Re-read `authorized_clients/` (after `python -m protocol.keys authorize`, or a key
        removed): new handshakes follow it at once, and `authorized` lists the keys whose
        messages the server answers from now on. ValueError names a file that is not a key."""
        if self._auth is None or self.keys_dir is None:
            return
        self._auth.configure_curve(domain="*", location=str(authorized_dir(self.keys_dir)))
        self.authorized = frozenset(key.decode("ascii") for key in self._auth.certs["*"])

    def police_connections(self) -> None:
        """Track connections from the monitor; close each one accepted beyond `max_connections`.

        Idle connections so cannot exhaust the process's descriptors: the running job, the store
        and the clients already connected keep theirs. Connections that never finish their
        handshake are closed by libzmq after HANDSHAKE_MS, so a client refused during a flood
        gets in once it reconnects after that. The server calls this whenever `monitor` is
        readable.
        """
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            fd = event["value"]
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._connections.discard(fd)
            elif len(self._connections) >= self.max_connections:
                self.refused_connections += 1
                _shut_down(fd)  # libzmq sees the end of the stream and closes its own descriptor
            else:
                self._connections.add(fd)

    @property
    def open_connections(self) -> int:
        """Connections currently kept."""
        return len(self._connections)

    def fileno(self) -> int:
        """The socket's event fd, for loops that also wait on other files."""
        return self.socket.getsockopt(zmq.FD)

    def recv(self, timeout_ms: int) -> Incoming | None:
        """The next message, or None when none arrived within `timeout_ms` (0: don't wait)."""
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.socket.recv_multipart(copy=False)
        peer = frames[0].bytes
        client_key = None
        if self._auth is not None:
            try:
                client_key = frames[-1].get("User-Id")
            except zmq.ZMQError:  # no ZAP metadata on this message: treat as anonymous
                client_key = None
        try:
            return Incoming(peer, client_key, decode(frames[1:], self.max_message_bytes), None)
        except ProtocolError as exc:
            return Incoming(peer, client_key, None, exc)

    def send(self, peer: bytes, msg: Message) -> bool:
        """Queue `msg` for `peer`; False, never an exception, when the peer is gone or full."""
        frames = encode(msg)
        try:
            self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # EHOSTUNREACH: unknown peer; EAGAIN: its queue is full
            return False
        return True

    def close(self) -> None:
        """Close the socket (short linger), stop the authenticator, end an own context."""
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if not self.socket.closed:
            self.socket.close(linger=LINGER_MS)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and not self.context.closed:
            self.context.term()

    def __enter__(self) -> ServerSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut_down(fd: int) -> None:
    """Shut a TCP connection that libzmq owns; the descriptor stays libzmq's to close."""
    try:
        conn = socket.socket(fileno=fd)
    except OSError:  # closed meanwhile
        return
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        conn.detach()


_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)
_CONNECTION_STATE = {
    zmq.EVENT_CONNECTED: "connected, handshake not finished",
    zmq.EVENT_CONNECT_RETRIED: "the connection was refused (nothing listening there?)",
    zmq.EVENT_DISCONNECTED: "the connection dropped",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused this client's key (not in its authorized_clients?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (wrong server public key, or keys on one side only?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed (wrong server public key, or keys on one side only?)",
}


class ClientSocket:
    """The add-on's DEALER socket to one backend."""

    def __init__(
        self,
        address: str,
        *,
        server_public_key: bytes | str | None = None,
        client_keys_dir: Path | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        context: zmq.Context | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Connect to `address`; CurveZMQ needs both the server's z85 public key and our key folder."""
        if (server_public_key is None) != (client_keys_dir is None):
            missing = "client_keys_dir" if client_keys_dir is None else "server_public_key"
            raise ValueError(f"CurveZMQ needs both server_public_key and client_keys_dir; {missing} is missing")
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.secure = server_public_key is not None
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self._pending: collections.deque[Message] = collections.deque()
        self._state = "no connection attempt finished yet"
        self._handshake_failed = False
        self.socket = self.context.socket(zmq.DEALER)
        self._monitor: zmq.Socket | None = None
        try:
            _common_options(self.socket, heartbeat_ms, max_message_bytes)
            if server_public_key is not None and client_keys_dir is not None:
                key = server_public_key.encode("ascii") if isinstance(server_public_key, str) else server_public_key
                if len(key) != 40:
                    raise ValueError(f"server_public_key must be 40 z85 characters, got {len(key)}")
                public, secret = load_client_keys(client_keys_dir)
                self.socket.curve_serverkey = key
                self.socket.curve_publickey = public
                self.socket.curve_secretkey = secret
            self._monitor = self.socket.get_monitor_socket(_MONITOR_EVENTS)
            self.socket.connect(address)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        """The socket's event fd, for loops that also wait on other files."""
        return self.socket.getsockopt(zmq.FD)

    def connection_state(self) -> str:
        """What the transport last reported about the connection, in words."""
        self._drain_monitor()
        return self._state

    def _drain_monitor(self) -> bool:
        """Read pending monitor events; True when a security handshake failed.

        A handshake failure is the most telling thing the transport reports, so the disconnects
        and reconnects that follow it do not replace it until a handshake succeeds.
        """
        failed = False
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in _HANDSHAKE_FAILURES:
                failed, self._handshake_failed = True, True
                self._state = _CONNECTION_STATE[event]
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failed = False
                self._state = _CONNECTION_STATE[event]
            elif not self._handshake_failed:
                self._state = _CONNECTION_STATE.get(event, self._state)
        return failed

    def send(self, msg: Message) -> None:
        """Queue `msg` for the server; TimeoutError when the send queue is full."""
        try:
            self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise TimeoutError(
                f"cannot send {msg.type} to {self.address}: the send queue is full ({self.connection_state()})"
            ) from None

    def _recv_now(self, timeout_ms: int) -> Message | None:
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode(self.socket.recv_multipart(copy=False), self.max_message_bytes)

    def recv(self, timeout_ms: int) -> Message | None:
        """The next message (reply, event, progress) in arrival order, or None after `timeout_ms`.

        Raises ProtocolError when the server sent frames that break the protocol.
        """
        if self._pending:
            return self._pending.popleft()
        return self._recv_now(timeout_ms)

    def request(self, msg: Message, timeout_s: float = 10.0) -> Message:
        """Send `msg` and wait for the message whose `reply_to` is its `msg_id` (may be `error`).

        Other messages arriving meanwhile are kept, in order, for `recv`. Raises TimeoutError,
        saying what the transport saw, when no reply comes within `timeout_s`, and at once when the
        security handshake fails (unknown client key, wrong server key, keys on one side only).
        """
        deadline = time.monotonic() + timeout_s
        self.send(msg)
        while True:
            remaining = deadline - time.monotonic()
            if self._drain_monitor():  # a failed handshake does not fix itself: fail fast
                raise TimeoutError(f"no reply from {self.address} to {msg.type}: {self._state}")
            if remaining <= 0:
                raise TimeoutError(
                    f"no reply from {self.address} within {timeout_s:g}s to {msg.type}: {self._state}"
                )
            reply = self._recv_now(min(int(remaining * 1000) + 1, 100))
            if reply is None:
                continue
            if reply.reply_to == msg.msg_id:
                return reply
            self._pending.append(reply)

    def close(self) -> None:
        """Close the socket (short linger) and an own context."""
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if not self.socket.closed:
            self.socket.close(linger=LINGER_MS)
        if self._own_context and not self.context.closed:
            self.context.term()

    def __enter__(self) -> ClientSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The add-on's one connection to the backend: requests, replies, events, all without blocking.

`ClientSession` owns one DEALER socket (`protocol.transport.ClientSocket`). Requests are sent at
once and their replies matched later by `reply_to`; `poll()` reads what has arrived without
waiting and returns typed updates for the Blender layer to apply on the main thread. A request
whose reply does not come within its timeout turns into a `RequestFailed` with code "timeout", so
an unreachable backend is reported within seconds and nothing ever waits on the network.

While it follows an unfinished job, the session sends a heartbeat (`list_jobs`) every
`HEARTBEAT_S`. A heartbeat unanswered for `HEARTBEAT_MISSES` intervals fails with code "timeout"
and context `heartbeat`, which tells the add-on the backend stopped answering. Its replies also
show a job the server has gone ahead on while no events came (a backend restarted between two
heartbeats forgot the subscription): after two such heartbeats in a row the job is subscribed
again from its last received seq.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from . import _protocol
from .jobs import JobRecord

Message = _protocol.Message
MessageType = _protocol.messages.MessageType

CLIENT_NAME = "dreamloom-blender"
"""Sent as `client_name` in `hello`."""

DEFAULT_TIMEOUT_S = 5.0
"""Seconds a request waits for its reply before it counts as failed."""

HEARTBEAT_S = 2.0
"""Seconds between heartbeats while a followed job has not finished."""

HEARTBEAT_MISSES = 3
"""Heartbeat intervals without a reply after which the backend counts as unreachable."""

STALLED_HEARTBEATS = 2
"""Heartbeats in a row that show the server ahead of a job before it is subscribed again."""

ADDRESS_SCHEMES = ("tcp://", "ipc://", "inproc://")
"""ZeroMQ transports an address may use."""


class SessionError(RuntimeError):
    """The session cannot be set up; `field` names the preference at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ConnectionSettings:
    """Where the backend is and how to authenticate to it."""

    address: str = "tcp://127.0.0.1:5555"
    """ZeroMQ address of the backend's ROUTER socket."""
    server_public_key: str = ""
    """The server's Z85 CurveZMQ public key ("" on loopback without keys)."""
    client_keys_dir: str = ""
    """Folder with this client's key pair from `python -m protocol.keys client DIR` ("" for none)."""
    client_version: str = "0.1.0"
    """Sent as `client_version` in `hello`."""


@dataclass
class PendingRequest:
    """A request sent and not yet answered."""

    message: Message
    """The request as sent."""
    timeout_s: float
    """Seconds it may wait for its reply."""
    deadline: float
    """time.monotonic() after which it counts as failed."""
    context: dict = field(default_factory=dict)
    """Whatever the caller needs back with the reply (prompt, target object name, ...)."""


@dataclass
class RequestDone:
    """A request got its successful reply."""

    request_type: str
    """The request's type, e.g. "submit"."""
    reply: Message
    """The reply message."""
    context: dict
    """The context given with the request."""


@dataclass
class RequestFailed:
    """A request got an `error` reply or no reply in time."""

    request_type: str
    """The request's type."""
    code: str
    """The server's error code, or "timeout"."""
    message: str
    """One sentence a person can act on."""
    field: str | None
    """Dotted path of the offending field, when one is at fault."""
    context: dict
    """The context given with the request."""
    job_id: str | None = None
    """The job the request concerned, if any."""


@dataclass
class JobEvent:
    """An event of a followed job, ready to apply (updates come in seq order, each once)."""

    job: JobRecord
    """The job, with `last_seq` already at this event's seq."""
    message: Message
    """The `event` message (body and buffers)."""

    @property
    def seq(self) -> int:
        """The event's seq."""
        return int(self.message.seq)


@dataclass
class JobProgress:
    """A `progress` message updated a followed job (stage, step, time left, preview)."""

    job: JobRecord
    """The job, already updated."""


Update = RequestDone | RequestFailed | JobEvent | JobProgress


def check_address(address: str) -> str:
    """Return the address stripped, or raise SessionError naming `backend_address`."""
    address = address.strip()
    if not address.startswith(ADDRESS_SCHEMES) or len(address) <= len("tcp://"):
        raise SessionError(
            "backend_address",
            f"backend_address {address!r} is not a ZeroMQ address like tcp://127.0.0.1:5555",
        )
    return address


class ClientSession:
    """One connection to one backend; every method returns at once."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.address = check_address(settings.address)
        self.socket = self._open_socket()
        self.pending: dict[str, PendingRequest] = {}
        """Requests sent and not yet answered, by msg_id."""
        self.jobs: dict[str, JobRecord] = {}
        """Jobs this session follows, by job_id."""
        self.welcome: dict | None = None
        """The body of `welcome` once it came (device, models, ...)."""
        self.server_jobs: list[dict] = []
        """The newest `jobs` list from the server."""
        self._hello_deadline: float | None = None
        self._next_heartbeat = time.monotonic() + HEARTBEAT_S
        self._behind: dict[str, int] = {}
        """job_id -> heartbeats in a row whose server last_seq was ahead of the received one."""

    def _open_socket(self) -> Any:
        keys_dir = self.settings.client_keys_dir.strip() or None
        server_key = self.settings.server_public_key.strip() or None
        if (keys_dir is None) != (server_key is None):
            field_name = "server_public_key" if server_key is None else "client_keys_dir"
            raise SessionError(
                field_name,
                f"{field_name} is empty: a secured backend needs both the server's public key "
                "and a client key pair",
            )
        try:
            return _protocol.transport.ClientSocket(
                self.address,
                server_public_key=server_key,
                client_keys_dir=None if keys_dir is None else Path(keys_dir),
            )
        except (ValueError, OSError, _protocol.ProtocolError, _protocol.zmq_error) as exc:
            field_name = "client_keys_dir" if keys_dir and "key" in str(exc).lower() else "backend_address"
            raise SessionError(field_name, f"cannot open a connection to {self.address}: {exc}") from exc

    # 1. Sending ---------------------------------------------------------------------------------

    def request(
        self,
        type: str,
        body: dict | None = None,
        buffers: dict | None = None,
        job_id: str | None = None,
        context: dict | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> str:
        """Send a request now; its reply comes back from `poll()`. Returns the msg_id."""
        message = Message(type=type, body=dict(body or {}), buffers=dict(buffers or {}), job_id=job_id)
        self.socket.send(message)  # TimeoutError when the send queue is full
        # Before `welcome`, a reply cannot come sooner than the connection: wait for hello first.
        start = time.monotonic()
        if self.welcome is None and self._hello_deadline is not None:
            start = max(start, self._hello_deadline)
        self.pending[message.msg_id] = PendingRequest(message, timeout_s, start + timeout_s, dict(context or {}))
        return message.msg_id

    def hello(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
        """Send `hello`; `welcome` fills `self.welcome`."""
        body = {"client_name": CLIENT_NAME, "client_version": self.settings.client_version, "protocol": 1}
        self._hello_deadline = None
        msg_id = self.request(MessageType.HELLO, body, timeout_s=timeout_s)
        self._hello_deadline = self.pending[msg_id].deadline
        return msg_id

    def submit(self, kind: str, params: dict, buffers: dict, context: dict | None = None) -> str:
        """Send a job; once `accepted`, it is followed from seq 0."""
        payload_bytes = sum(len(b) if isinstance(b, (bytes, bytearray)) else b.nbytes for b in buffers.values())
        timeout_s = DEFAULT_TIMEOUT_S + payload_bytes / 20e6  # allow for a slow link with big meshes
        ctx = {"kind": kind, "prompt": params.get("prompt", ""), **(context or {})}
        return self.request(MessageType.SUBMIT, {"kind": kind, "params": params}, buffers, context=ctx, timeout_s=timeout_s)

    def follow(self, job_id: str, after_seq: int, kind: str = "generate", prompt: str = "") -> JobRecord:
        """Subscribe to a job from `after_seq` (the last seq already applied)."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobRecord(job_id=job_id, kind=kind, prompt=prompt, last_seq=after_seq)
        self._subscribe(job)
        return job

    def _subscribe(self, job: JobRecord) -> None:
        """Ask for the job's events after the last one received."""
        self.request(MessageType.SUBSCRIBE, {"job_id": job.job_id, "after_seq": int(job.last_seq)}, job_id=job.job_id)

    def cancel(self, job_id: str) -> str:
        """Ask the server to cancel a job; the job's `state: cancelled` event follows."""
        return self.request(MessageType.CANCEL, {"job_id": job_id}, job_id=job_id)

    def list_jobs(self) -> str:
        """Ask for the server's job list; it lands in `self.server_jobs`, every page of it."""
        return self.request(MessageType.LIST_JOBS)

    def delete_job(self, job_id: str) -> str:
        """Delete a job on the server (cancelling it first if it runs)."""
        return self.request(MessageType.DELETE_JOB, {"job_id": job_id}, job_id=job_id)

    def get_result(self, job_id: str, context: dict | None = None) -> str:
        """Ask for the final GLB of a done job."""
        return self.request(MessageType.GET_RESULT, {"job_id": job_id}, job_id=job_id, context=context, timeout_s=60.0)

    # 2. Receiving -------------------------------------------------------------------------------

    def poll(self, max_messages: int = 64) -> list[Update]:
        """Read what has arrived (never waits) and expire overdue requests."""
        updates: list[Update] = []
        for _ in range(max_messages):
            message = self.socket.recv(0)
            if message is None:
                break
            updates.extend(self._handle(message))
        now = time.monotonic()
        updates.extend(self._expire(now))
        self._heartbeat(now)
        return updates

    def _heartbeat(self, now: float) -> None:
        """Send a heartbeat when one is due, a job is followed, and no heartbeat is out."""
        if self.welcome is None or now < self._next_heartbeat or not any(not j.finished for j in self.jobs.values()):
            return
        if any(p.context.get("heartbeat") for p in self.pending.values()):
            return
        self._next_heartbeat = now + HEARTBEAT_S
        self.request(MessageType.LIST_JOBS, context={"heartbeat": True}, timeout_s=HEARTBEAT_S * HEARTBEAT_MISSES)

    def _catch_up_stalled(self, server_jobs: list[dict]) -> None:
        """Subscribe again to followed jobs the server is ahead on for STALLED_HEARTBEATS in a row."""
        ahead = {str(j.get("job_id")): int(j.get("last_seq") or 0) for j in server_jobs}
        for job_id, job in self.jobs.items():
            if job.finished or ahead.get(job_id, 0) <= job.last_seq:
                self._behind.pop(job_id, None)
                continue
            self._behind[job_id] = self._behind.get(job_id, 0) + 1
            if self._behind[job_id] >= STALLED_HEARTBEATS:
                self._behind.pop(job_id)
                self._subscribe(job)

    def _handle(self, message: Message) -> list[Update]:
        if message.type == MessageType.EVENT:
            return self._handle_event(message)
        if message.type == MessageType.PROGRESS:
            job = self.jobs.get(message.job_id or "")
            if job is None:
                return []
            job.apply_progress(message.body, _as_bytes(message.buffers.get("preview")))
            return [JobProgress(job)]
        pending = self.pending.pop(message.reply_to or "", None)
        if pending is None:
            return []  # a late reply to a request that already timed out
        request_type = pending.message.type
        if message.type == MessageType.ERROR:
            return [self._failed(pending, message.body)]
        if request_type == MessageType.LIST_JOBS and message.body.get("next_cursor") is not None:
            # A page of a longer list: ask for the next one; the whole list lands with the last.
            so_far = pending.context.get("jobs_so_far", []) + list(message.body.get("jobs") or [])
            self.request(MessageType.LIST_JOBS, {"cursor": message.body["next_cursor"]},
                         context={**pending.context, "jobs_so_far": so_far}, timeout_s=pending.timeout_s)
            return []
        self._note_reply(request_type, message, pending)
        return [RequestDone(request_type, message, pending.context)]

    def _handle_event(self, message: Message) -> list[Update]:
        job_id = message.job_id or ""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobRecord(job_id=job_id)
        updates: list[Update] = []
        for ready in job.accept(int(message.seq or 0), message):
            job.apply_state(ready.body)
            updates.append(JobEvent(job, ready))
        return updates

    def _note_reply(self, request_type: str, reply: Message, pending: PendingRequest) -> None:
        body = reply.body
        if request_type == MessageType.HELLO:
            self.welcome = dict(body)
        elif request_type == MessageType.SUBMIT:
            job_id = str(body["job_id"])
            ctx = pending.context
            self.jobs.setdefault(job_id, JobRecord(job_id=job_id, kind=ctx.get("kind", "generate"), prompt=ctx.get("prompt", "")))
        elif request_type == MessageType.LIST_JOBS:
            self.server_jobs = pending.context.get("jobs_so_far", []) + list(body.get("jobs") or [])
            self._catch_up_stalled(self.server_jobs)
        elif request_type == MessageType.DELETE_JOB:
            self.jobs.pop(str(body.get("job_id")), None)
            self.server_jobs = [j for j in self.server_jobs if j.get("job_id") != body.get("job_id")]

    def _failed(self, pending: PendingRequest, body: dict) -> RequestFailed:
        return RequestFailed(
            request_type=pending.message.type,
            code=str(body.get("code", "internal")),
            message=str(body.get("message", "the backend sent an error without a message")),
            field=body.get("field"),
            context=pending.context,
            job_id=pending.message.job_id,
        )

    def _expire(self, now: float) -> list[Update]:
        overdue = [msg_id for msg_id, p in self.pending.items() if p.deadline < now]
        failures: list[Update] = []
        transport = self.socket.connection_state() if overdue else ""
        for msg_id in overdue:
            pending = self.pending.pop(msg_id)
            failures.append(
                RequestFailed(
                    request_type=pending.message.type,
                    code="timeout",
                    message=(
                        f"no reply from the backend at {self.address} to '{pending.message.type}' within "
                        f"{pending.timeout_s:g} s ({transport}): is it running, and are backend_address "
                        "and the keys right?"
                    ),
                    field="backend_address",
                    context=pending.context,
                    job_id=pending.message.job_id,
                )
            )
        return failures

    # 3. State -----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request waits for its reply or a followed job has not finished."""
        return bool(self.pending) or any(not job.finished for job in self.jobs.values())

    def close(self) -> None:
        """Close the socket (short linger); pending requests are dropped."""
        self.pending.clear()
        self.socket.close()


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value) if not isinstance(value, bytes) else value

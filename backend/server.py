"""The backend server: one ROUTER socket, the job store, worker threads running jobs.

Threads:

- the main loop (`Server.run`) is the only thread that touches the ROUTER socket. It answers
  requests, keeps the subscriptions and sends events and progress;
- one thread per worker runs one job at a time: with the runner in this process (`LocalWorker`,
  the default) or on a Ray actor (`backend.cluster`, `serve --ray`). Queued jobs go to the first
  free worker, fairly between client keys. Whatever a job reports is stored first (events), then
  handed to the main loop through a thread-safe queue and a wake-up message on an inproc PAIR
  socket, so the loop sleeps in `poll` while idle and sends within a millisecond.

A subscription remembers the seq of the last event it sent (`sent_seq`). Live events go out only
when they are exactly the next one; anything else (a subscriber that is behind, a send that
failed) is caught up from the store, so each subscriber gets every event once, in order.

Nothing a client sends and nothing the disk does ends the process: every request, its reply's
encoding included, and every step of the loop turn a failure into an `error` reply or a log
line; the worker survives a failed write, ends that job `failed` and waits until the store is
writable again. What is wrong is reported as `degraded` in `welcome` and `pong`. Everything a
client can make the server keep is bounded (docs/server.md, "Limits and guarantees").
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import signal
import sqlite3
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack
import zmq

from backend.jobs import JobContext, JobHooks, JobRunner, Outcome, run_job
from backend.jobs import one_line as _one_line
from backend.store import (
    FINISHED_STATES, Damage, JobRecord, JobStore, QueuedHead, StoreDamaged, StoredEvent, write_file_atomic,
)
from protocol import messages as pm
from protocol.codec import ProtocolError
from protocol.keys import authorized_dir
from protocol.messages import ErrorCode, Message, MessageType
from protocol.transport import DEFAULT_MAX_CONNECTIONS, Incoming, ServerSocket, is_loopback

log = logging.getLogger("dreamloom.server")

SERVER_VERSION = "0.1.0"
DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_MAX_QUEUE = 64
POLL_MS = 200
"""Longest sleep of the main loop between checks of the stop flag."""
RETRY_BEHIND_S = 0.2
"""How often a subscriber whose send failed is tried again."""
DROP_AFTER_S = 15.0
"""A subscription whose sends keep failing this long is dropped (the peer is gone); the
client gets everything again by subscribing with its last seq."""
WORKER_JOIN_S = 15.0
"""How long shutdown waits for the running job to reach its next `check_cancelled`."""
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_MAX_JOBS_PER_KEY = 1000
DEFAULT_MAX_BYTES_PER_KEY = 20 * 2**30
JOBS_PAGE = 100
"""Jobs in a `jobs` reply when `list_jobs` gives no `limit`."""
MAX_JOBS_PAGE = 1000
"""Largest `limit` of a `list_jobs`."""
JOBS_REPLY_BYTES = 512 * 2**10
"""A `jobs` page stops before its entries pass this many bytes (the body limit is 1 MiB)."""
DROPPED_WINDOW_S = 60.0
"""Jobs cancelled or deleted while queued count against `max_queue` for this many seconds."""
MAX_SUBSCRIPTIONS_PER_PEER = 64
"""Subscriptions one connection keeps; a newer one replaces its oldest."""
MAX_SUBSCRIPTIONS = 4096
"""Subscriptions the server keeps in all; a newer one replaces the oldest."""
FD_RESERVE = 256
"""File descriptors kept free of client connections, for the store, the log and the job."""
RETENTION_EVERY_S = 3600.0
"""How often finished jobs past `keep_days` are removed (and once at start)."""
KEYS_CHECK_S = 1.0
"""How often `authorized_clients/` is looked at for changes."""
STORE_RETRY_S = (1.0, 30.0)
"""First and longest wait of the worker between tries while the store cannot be written."""
MAX_PROBLEMS = 20
"""Problems listed in `degraded` (the log has them all)."""
MAX_WORKER_LOSSES = 2
"""A job whose worker died under it this many times in a row fails instead of resuming again."""


class ConfigError(Exception):
    """The server cannot start with these settings (the message says which and why)."""


@dataclass
class ServerConfig:
    """Everything `python -m backend serve` takes."""

    store_dir: Path
    """Folder of the job store (created if missing)."""
    bind: str = DEFAULT_BIND
    """ZeroMQ address of the ROUTER socket; port `*` or 0 picks a free port."""
    keys_dir: Path | None = None
    """CurveZMQ key folder (protocol.keys layout); None: no encryption (loopback only)."""
    insecure: bool = False
    """Allow a non-loopback bind without keys (warned about at every start)."""
    max_queue: int = DEFAULT_MAX_QUEUE
    """Most jobs waiting (not counting the running one); more get `queue_full`."""
    device: str = "cpu"
    """Device the runner is built for: "cpu" or "cuda"."""
    models: str = "default"
    """Model set name the runner loads (backend.pipeline.make_runner)."""
    preset: str | None = None
    """A preset forced on every job (`--preset`), else None: each job's `quality`."""
    keep_days: float = DEFAULT_KEEP_DAYS
    """Finished jobs are removed this many days after they ended; 0 keeps them until deleted."""
    max_jobs_per_key: int = DEFAULT_MAX_JOBS_PER_KEY
    """Most jobs one client key keeps in the store; more get `queue_full`."""
    max_bytes_per_key: int = DEFAULT_MAX_BYTES_PER_KEY
    """Most bytes of job files one client key keeps in the store; more get `queue_full`."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open client connections kept (also held below the descriptor limit less FD_RESERVE)."""


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker runs a job, for the `worker` field of `jobs` entries."""

    name: str
    """Unique within the server, e.g. "10.0.0.7/gpu1" or "local"."""
    node: str
    """The machine: its address on a Ray cluster, the host name in this process."""
    gpu: str | None
    """The GPU the worker owns ("0", "1"...), None for a worker on the CPU."""

    def listing(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "gpu": self.gpu}


class WorkerLost(Exception):
    """The worker died under a job (its process or its node is gone): the job resumes from its
    newest checkpoint on the next free worker."""


class JobWorker(Protocol):
    """What a worker thread of the server runs jobs with."""

    info: WorkerInfo
    device: str
    """For `welcome`."""
    models: dict[str, str]
    """For `welcome`."""

    def execute(self, ctx: JobContext, record: JobRecord) -> Outcome:
        """Run the job of `ctx` (its stored `record`); raises WorkerLost when the worker died."""
        ...

    def recover(self) -> bool:
        """After WorkerLost: wait until the worker serves again (True), or False when it cannot
        and leaves the pool (the reason is logged and in `problem`)."""
        ...

    problem: str | None
    """Why the worker left the pool, once `recover` returned False."""


@dataclass
class LocalWorker:
    """Runs jobs with a runner in this process (the server without --ray)."""

    runner: JobRunner
    info: WorkerInfo = field(default_factory=lambda: WorkerInfo("local", socket.gethostname(), None))
    problem: str | None = None

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def models(self) -> dict[str, str]:
        return dict(self.runner.models)

    def execute(self, ctx: JobContext, record: JobRecord) -> Outcome:
        return run_job(self.runner, ctx)

    def recover(self) -> bool:
        return True  # it never dies without the server


@dataclass
class RunningJob:
    """A job a worker runs now."""

    hooks: JobHooks
    worker: WorkerInfo
    owner: str


@dataclass
class Subscription:
    """One client's subscription to one job."""

    peer: bytes
    """The client's ROUTER routing id."""
    job_id: str
    """The job subscribed to."""
    sent_seq: int
    """Seq of the last event sent to this client (it has all events up to here)."""
    failing_since: float | None = None
    """Monotonic time of the first failed send of a run of failures; None while sends work."""
    retry_at: float = 0.0
    """Monotonic time of the next catch-up attempt while behind."""


@dataclass
class _Outbox:
    """What the worker hands the main loop: stored events in order, the newest progress."""

    events: "queue.SimpleQueue[StoredEvent]" = field(default_factory=queue.SimpleQueue)
    """Events already in the store, to send to subscribers."""
    progress: dict[str, tuple[dict, dict]] = field(default_factory=dict)
    """job_id -> (body, buffers) of its newest progress; a newer one replaces it."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards `progress`."""


def check_bind_security(config: ServerConfig) -> None:
    """Refuse a non-loopback bind without keys unless `insecure` (PROTOCOL.md section 7)."""
    if config.keys_dir is None and not config.insecure and not is_loopback(config.bind):
        raise ConfigError(
            f"refusing to bind {config.bind} without CurveZMQ keys: pass --keys DIR "
            "(make one with `python -m protocol.keys server DIR`), bind to 127.0.0.1, "
            "or pass --insecure to accept unencrypted remote clients"
        )


def load_runner(models: str, device: str, preset: str | None = None) -> tuple[JobRunner | None, str | None]:
    """The pipeline's runner, or (None, why) when the pipeline module is not installed.

    Any other failure (a broken pipeline, a missing CUDA device) propagates: the server must not
    start as if it could run jobs.
    """
    try:
        from backend import pipeline
    except ModuleNotFoundError as exc:
        if exc.name not in ("backend.pipeline",):
            raise
        return None, f"the generation pipeline is not installed: {exc}"
    return pipeline.make_runner(models=models, device=device, preset=preset), None


class Server:
    """The server loop, its store and its workers (see the module docstring)."""

    def __init__(self, config: ServerConfig, runner: JobRunner | None, runner_missing: str | None = None,
                 workers: list[JobWorker] | None = None) -> None:
        if workers is None:
            workers = [LocalWorker(runner)] if runner is not None else []
        if not workers and not runner_missing:
            raise ValueError("runner_missing must say why there is no runner")
        self.config = config
        self.workers = list(workers)
        """The workers serving; one that dies for good leaves the list."""
        self.runner_missing = runner_missing
        self.store = JobStore(config.store_dir)
        self.bound_address: str | None = None
        """The address actually bound (the port filled in), once `ready` is set."""
        self.ready = threading.Event()
        """Set when the socket is bound and the worker runs."""
        self._stop = threading.Event()
        self._shutdown = threading.Event()
        self._work = threading.Event()
        self._outbox = _Outbox()
        self._subs: dict[tuple[bytes, str], Subscription] = {}
        self._running: dict[str, RunningJob] = {}
        """job_id -> the job a worker runs now (guarded by `_current_lock`)."""
        self._current_lock = threading.Lock()
        self._served: dict[str, float] = {}
        """owner -> monotonic time a worker last took one of its jobs (the fair queue)."""
        self._losses: dict[str, list[str]] = {}
        """job_id -> the workers that died under it in a row."""
        self._wake_lock = threading.Lock()
        self._zctx = zmq.Context()
        self._wake_rx = self._zctx.socket(zmq.PAIR)
        self._wake_tx = self._zctx.socket(zmq.PAIR)
        self._threads: list[threading.Thread] = []
        self._sock: ServerSocket = None
        self._problems: dict[str, str] = {}
        """What is wrong now, by source ("worker NAME" for each worker, "store", "keys"): reported
        in `degraded`."""
        self._damage: list[Damage] = list(self.store.damage)
        """Damage found in the store, at start and since."""
        self._dropped: collections.deque[float] = collections.deque()
        """Monotonic times at which queued jobs were cancelled or deleted (DROPPED_WINDOW_S)."""
        self._reload_keys = threading.Event()
        self._keys_seen: tuple = ()
        self._next_keys_check = 0.0
        self._next_retention = 0.0
        for item in self._damage:
            log.error("store damaged: %s", item.line())
        self._handlers: dict[str, Callable[[Incoming, Message], Message]] = {
            MessageType.HELLO: self._hello,
            MessageType.SUBMIT: self._submit,
            MessageType.CANCEL: self._cancel,
            MessageType.SUBSCRIBE: self._subscribe,
            MessageType.UNSUBSCRIBE: self._unsubscribe,
            MessageType.LIST_JOBS: self._list_jobs,
            MessageType.GET_RESULT: self._get_result,
            MessageType.DELETE_JOB: self._delete_job,
            MessageType.PING: self._ping,
        }

    # 1. Life cycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop (from any thread or a signal handler); `run` returns soon."""
        self._stop.set()
        self._wake()

    def reload_keys(self) -> None:
        """Re-read `authorized_clients/` soon (SIGHUP; a change of the folder does it too)."""
        self._reload_keys.set()
        self._wake()

    def run(self) -> None:
        """Bind, start the worker, serve until `stop`, then shut down gracefully."""
        address = f"inproc://dreamloom-wake-{id(self)}"
        self._wake_rx.bind(address)
        self._wake_tx.connect(address)
        sock = None
        try:
            sock = ServerSocket(
                self.config.bind, keys_dir=self.config.keys_dir, context=self._zctx,
                allow_insecure=self.config.insecure,
                max_connections=min(self.config.max_connections, max(16, _raise_descriptor_limit() - FD_RESERVE)),
            )
            self._sock = sock
            self.bound_address = sock.bound_address
            for worker in self.workers:
                thread = threading.Thread(target=self._work_loop, args=(worker,),
                                          name=f"dreamloom-worker-{worker.info.name}", daemon=True)
                thread.start()
                self._threads.append(thread)
            log.info("listening on %s (store %s)", self.bound_address, self.config.store_dir)
            if self.config.preset is not None:
                log.info("every job runs at the %s preset, whatever its quality (--preset)", self.config.preset)
            self.ready.set()
            self._loop(sock)
        finally:
            self._shutdown_worker()
            if sock is not None:
                sock.close()
            self._wake_rx.close(linger=0)
            self._wake_tx.close(linger=0)
            self._zctx.term()
            self.store.close()
            log.info("stopped")

    def _shutdown_worker(self) -> None:
        self._shutdown.set()
        self._work.set()
        deadline = time.monotonic() + WORKER_JOIN_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("a running job did not stop within %.0f s; it resumes at the next start", WORKER_JOIN_S)

    # 2. The main loop -------------------------------------------------------------------------

    def _loop(self, sock: ServerSocket) -> None:
        poller = zmq.Poller()
        poller.register(sock.socket, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        poller.register(sock.monitor, zmq.POLLIN)
        while not self._stop.is_set():
            # 1. Sleep until a request, a wake-up from the worker, a connection, or the next retry.
            ready = dict(poller.poll(self._poll_timeout_ms()))
            # 2. Drain wake-ups (one is enough to look at the outbox); keep connections capped.
            if self._wake_rx in ready:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            self._guarded(sock.police_connections)
            # 3. Answer every request that is waiting.
            if sock.socket in ready:
                self._guarded(self._serve_requests, sock)
            # 4. Send what the worker stored, then catch up subscribers that are behind.
            self._guarded(self._send_events, sock)
            self._guarded(self._send_progress, sock)
            self._guarded(self._catch_up, sock)
            # 5. Now and then: reload changed keys, remove jobs past their retention.
            self._guarded(self._watch_keys, sock)
            self._guarded(self._retention)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step of the loop; a fault of ours is logged and the loop goes on."""
        try:
            step(*args)
        except Exception:
            log.exception("the server loop failed in %s; it goes on", step.__name__)

    def _poll_timeout_ms(self) -> int:
        if any(sub.failing_since is not None or sub.retry_at for sub in self._subs.values()):
            return int(RETRY_BEHIND_S * 1000)
        return POLL_MS

    def _serve_requests(self, sock: ServerSocket) -> None:
        for _ in range(1000):  # bounded, so events still flow under a flood of requests
            incoming = sock.recv(0)
            if incoming is None:
                return
            self._reply(sock, incoming.peer, self._answer(incoming))

    def _reply(self, sock: ServerSocket, peer: bytes, reply: Message) -> None:
        """Send `reply`; a reply that cannot be encoded becomes an `internal` error instead."""
        try:
            sock.send(peer, reply)
        except Exception as exc:  # a reply we built breaks the limits: say so, keep serving
            log.exception("cannot encode the %s reply to %s", reply.type, reply.reply_to)
            fallback = pm.error(
                ErrorCode.INTERNAL,
                f"the server could not encode its {reply.type} reply: {type(exc).__name__}: {_one_line(exc)}",
                reply_to=reply.reply_to,
            )
            try:
                sock.send(peer, fallback)
            except Exception:
                log.exception("cannot encode the error reply to %s either", reply.reply_to)

    def _answer(self, incoming: Incoming) -> Message:
        """The reply to one received message; never raises."""
        if incoming.error is not None:
            return incoming.error.to_message()
        request: Message = incoming.message
        try:
            if self.config.keys_dir is not None and incoming.client_key not in self._sock.authorized:
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    "this client's key is no longer in the server's authorized_clients; ask its operator",
                )
            handler = self._handlers.get(request.type)
            if handler is None:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{request.type!r} is not a request a client can send", "type")
            return handler(incoming, request)
        except ProtocolError as exc:
            return pm.error(exc.code, exc.message, exc.field, reply_to=request.msg_id, job_id=request.job_id)
        except Exception as exc:  # a fault of ours: answer, log, keep serving
            log.exception("internal error answering %s %s", request.type, request.msg_id)
            return pm.error(
                ErrorCode.INTERNAL,
                f"the server failed answering {request.type}: {type(exc).__name__}: {_one_line(exc)}",
                reply_to=request.msg_id,
                job_id=request.job_id,
            )

    # 3. Requests -------------------------------------------------------------------------------

    def _hello(self, incoming: Incoming, request: Message) -> Message:
        version = request.body.get("protocol")
        if version != pm.PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"this server speaks protocol {pm.PROTOCOL_VERSION}, the client asked for {version!r}",
                "protocol",
            )
        assert self._sock is not None
        log.info("hello from %s %s", request.body.get("client_name"), request.body.get("client_version"))
        workers = self.workers  # one snapshot: a worker thread may rebind the list meanwhile
        return pm.reply_to(request, MessageType.WELCOME, {
            "server_version": SERVER_VERSION,
            "protocol": pm.PROTOCOL_VERSION,
            "device": self._device_line(workers),
            "models": workers[0].models if workers else {},
            "max_message_bytes": self._sock.max_message_bytes,
            "heartbeat_ms": self._sock.heartbeat_ms,
            **self._health(),
        })

    def _device_line(self, workers: list[JobWorker]) -> str:
        """`welcome`'s device: the worker's, or how many workers and the first one's."""
        if not workers:
            return self.config.device
        if len(workers) == 1:
            return workers[0].device
        return f"{len(workers)} workers: {workers[0].device}, ..."

    def _health(self) -> dict[str, Any]:
        """`degraded` (true while anything is wrong) and `problems` (one line each, newest
        runtime problems first, then store damage), for `welcome` and `pong`."""
        lines = list(self._problems.values()) + [item.line() for item in self._damage]
        return {"degraded": bool(lines), "problems": [pm.clip(line, 300) for line in lines[:MAX_PROBLEMS]]}

    def _submit(self, incoming: Incoming, request: Message) -> Message:
        from protocol.params import params_to_dict, validate_request_id, validate_submit

        kind = request.body.get("kind")
        owner = _owner(incoming)
        request_id = validate_request_id(request.body.get("request_id"))
        params = validate_submit(kind, request.body.get("params"), request.buffers)
        if not self.workers:
            raise ProtocolError(ErrorCode.INTERNAL, self.runner_missing or "no runner")
        # 1. A retried submit (same request_id) gets the job the first one made.
        earlier = self.store.find_request(owner, request_id) if request_id is not None else None
        if earlier is not None:
            key = (incoming.peer, earlier.job_id)
            if key not in self._subs:
                self._add_subscription(Subscription(incoming.peer, earlier.job_id, sent_seq=0, retry_at=time.monotonic()))
            return self._accepted(request, earlier.job_id, self.store.queue_position(earlier.job_id))
        # 2. The limits: submits per minute, jobs and bytes kept per key, jobs waiting.
        self._check_quota(owner, request.buffers)
        params_dict = params_to_dict(params)
        created = self.store.create_job(
            owner=owner, kind=kind, prompt=str(params_dict.get("prompt", "")),
            params=params_dict, inputs=dict(request.buffers), max_queued=self.config.max_queue,
            request_id=request_id,
        )
        if created is None:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"{self.config.max_queue} jobs are already waiting (the server's --max-queue); try again later",
            )
        record, queued = created
        position = queued.body["position"]
        self._add_subscription(Subscription(incoming.peer, record.job_id, sent_seq=0))
        self._publish(queued)
        self._work.set()
        log.info("job %s queued (%s, position %d)", record.job_id, kind, position)
        return self._accepted(request, record.job_id, position)

    def _accepted(self, request: Message, job_id: str, position: int) -> Message:
        reply = pm.reply_to(request, MessageType.ACCEPTED, {"job_id": job_id, "position": position})
        reply.job_id = job_id
        return reply

    def _check_quota(self, owner: str, buffers: dict) -> None:
        """`queue_full` naming the limit when this key may not store another job now."""
        while self._dropped and self._dropped[0] < time.monotonic() - DROPPED_WINDOW_S:
            self._dropped.popleft()
        if self._dropped and self.store.count_queued() + len(self._dropped) >= self.config.max_queue:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"{self.store.count_queued()} jobs wait and {len(self._dropped)} were cancelled while waiting in the "
                f"last {DROPPED_WINDOW_S:.0f} s (together at most the server's --max-queue {self.config.max_queue});"
                " try again later",
            )
        jobs, nbytes = self.store.usage(owner)
        incoming_bytes = sum(memoryview(value).nbytes for value in buffers.values())
        if jobs >= self.config.max_jobs_per_key:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"this client keeps {jobs} jobs on the server (its --max-jobs-per-key); delete some first",
            )
        if nbytes + incoming_bytes > self.config.max_bytes_per_key:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"this client's jobs take {nbytes} bytes on the server and this one brings {incoming_bytes} "
                f"(its --max-bytes-per-key is {self.config.max_bytes_per_key}); delete some first",
            )

    def _add_subscription(self, sub: Subscription) -> None:
        """Keep `sub`, dropping the peer's oldest beyond MAX_SUBSCRIPTIONS_PER_PEER and the
        server's oldest beyond MAX_SUBSCRIPTIONS (a peer that is still there subscribes again)."""
        key = (sub.peer, sub.job_id)
        self._subs.pop(key, None)
        mine = [k for k in self._subs if k[0] == sub.peer]
        for old in mine[: max(0, len(mine) + 1 - MAX_SUBSCRIPTIONS_PER_PEER)]:
            del self._subs[old]
        while len(self._subs) >= MAX_SUBSCRIPTIONS:
            del self._subs[next(iter(self._subs))]
        self._subs[key] = sub

    def _cancel(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        with self._current_lock:  # the worker claims jobs under this lock too
            cancelled = self.store.cancel_if_queued(job.job_id)
            waiting = cancelled is None and not self._request_cancel(job.job_id) and self.store.take_back(job.job_id)
        if waiting:  # running, but between workers (its worker died): no worker will pick it up now
            self._losses.pop(job.job_id, None)
            self._finish(job.job_id, "cancelled", None)
        if cancelled is not None:
            self._dropped.append(time.monotonic())
            self._publish(cancelled)
            log.info("job %s cancelled while queued", job.job_id)
        return pm.reply_to(request, MessageType.CANCELLED, {"job_id": job.job_id})

    def _subscribe(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        after_seq = request.body.get("after_seq", 0)
        if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"after_seq must be an int >= 0, got {after_seq!r}", "after_seq")
        sub = Subscription(incoming.peer, job.job_id, sent_seq=min(after_seq, job.last_seq))
        sub.retry_at = time.monotonic()  # replay the stored events right after the reply
        self._add_subscription(sub)
        reply = pm.reply_to(request, MessageType.SUBSCRIBED, {"job_id": job.job_id, "last_seq": job.last_seq})
        reply.job_id = job.job_id
        return reply

    def _unsubscribe(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        self._subs.pop((incoming.peer, job.job_id), None)
        return pm.reply_to(request, MessageType.UNSUBSCRIBED, {"job_id": job.job_id})

    def _list_jobs(self, incoming: Incoming, request: Message) -> Message:
        cursor = _int_field(request.body, "cursor", 0, 0, 2**62)
        limit = _int_field(request.body, "limit", JOBS_PAGE, 1, MAX_JOBS_PAGE)
        records = self.store.list_jobs(owner=_owner(incoming), after=cursor, limit=limit + 1)
        with self._current_lock:
            running = {job_id: job.worker for job_id, job in self._running.items()}
        entries: list[dict[str, Any]] = []
        size = 0
        for record in records[:limit]:
            entry = record.listing()
            if record.job_id in running and record.state == "running":
                entry["worker"] = running[record.job_id].listing()
            size += len(msgpack.packb(entry))
            if entries and size > JOBS_REPLY_BYTES:
                break
            entries.append(entry)
        more = len(entries) < len(records)
        next_cursor = records[len(entries) - 1].order_no if more else None
        return pm.reply_to(request, MessageType.JOBS, {"jobs": entries, "next_cursor": next_cursor})

    def _get_result(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        glb = self.store.load_result(job.job_id) if job.state == "done" else None
        if glb is None:
            raise ProtocolError(ErrorCode.NOT_READY, f"job {job.job_id} is {job.state}; its result exists once it is done", "job_id")
        reply = pm.reply_to(request, MessageType.RESULT, {"job_id": job.job_id, "format": "glb"}, {"model": glb})
        reply.job_id = job.job_id
        return reply

    def _delete_job(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        if job.state == "queued":
            self._dropped.append(time.monotonic())
        with self._current_lock:  # the worker claims jobs under this lock too
            self.store.mark_deleted(job.job_id)
            running = self._request_cancel(job.job_id)
        self._drop_subscriptions(job.job_id)
        if not running:
            self.store.purge(job.job_id)  # nothing else holds its files; else the worker purges
        log.info("job %s deleted", job.job_id)
        return pm.reply_to(request, MessageType.DELETED, {"job_id": job.job_id})

    def _drop_subscriptions(self, job_id: str) -> None:
        """Forget every client's subscription to `job_id` (deleted or expired)."""
        for key in [key for key in self._subs if key[1] == job_id]:
            del self._subs[key]

    def _ping(self, incoming: Incoming, request: Message) -> Message:
        return pm.reply_to(request, MessageType.PONG, self._health())

    def _visible_job(self, incoming: Incoming, request: Message) -> JobRecord:
        job_id = request.body.get("job_id", request.job_id)
        if not isinstance(job_id, str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"job_id must be a string, got {job_id!r}", "job_id")
        job = self.store.get_job(job_id)
        if job is None or job.owner not in ("", _owner(incoming)):
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"there is no job {job_id!r} for this client", "job_id")
        return job

    def _request_cancel(self, job_id: str) -> bool:
        """Flag the running job for cancellation; False if it is not the running one.
        The caller holds `_current_lock`."""
        if job_id not in self._running:
            return False
        self._running[job_id].hooks.cancel.set()
        log.info("job %s: cancel requested", job_id)
        return True

    # 4. Sending events and progress -------------------------------------------------------------

    def _publish(self, event: StoredEvent) -> None:
        """Hand a stored event to the main loop (any thread)."""
        self._outbox.events.put(event)
        self._wake()

    def _publish_progress(self, job_id: str, body: dict, buffers: dict) -> None:
        with self._outbox.lock:
            self._outbox.progress[job_id] = (body, buffers)
        self._wake()

    def _wake(self) -> None:
        # A signal handler may run while this thread holds the lock: never block on it.
        if not self._wake_lock.acquire(timeout=0.05):
            return
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a wake-up is already pending, or the loop is closing
        finally:
            self._wake_lock.release()

    def _send_events(self, sock: ServerSocket) -> None:
        while True:
            try:
                event = self._outbox.events.get_nowait()
            except queue.Empty:
                return
            for sub in [s for s in list(self._subs.values()) if s.job_id == event.job_id]:
                if sub.failing_since is None and sub.sent_seq == event.seq - 1:
                    self._send_event(sock, sub, event)
                elif sub.sent_seq < event.seq:
                    sub.retry_at = sub.retry_at or time.monotonic()

    def _send_event(self, sock: ServerSocket, sub: Subscription, event: StoredEvent) -> bool:
        msg = Message(type=MessageType.EVENT, body=event.body, buffers=event.buffers, job_id=event.job_id, seq=event.seq)
        if sock.send(sub.peer, msg):
            sub.sent_seq = event.seq
            sub.failing_since = None
            if event.type == "state" and event.body.get("state") in FINISHED_STATES:
                self._subs.pop((sub.peer, sub.job_id), None)  # the job's last event: nothing follows
            return True
        now = time.monotonic()
        sub.failing_since = sub.failing_since or now
        sub.retry_at = now + RETRY_BEHIND_S
        return False

    def _catch_up(self, sock: ServerSocket) -> None:
        now = time.monotonic()
        for key, sub in list(self._subs.items()):
            if not sub.retry_at or sub.retry_at > now:
                continue
            if sub.failing_since is not None and now - sub.failing_since > DROP_AFTER_S:
                log.info("dropping the subscription of an unreachable client to job %s", sub.job_id)
                del self._subs[key]
                continue
            sub.retry_at = 0.0
            try:
                events = self.store.events_after(sub.job_id, sub.sent_seq)
            except StoreDamaged as exc:  # that job's files only: tell its subscriber, serve the rest
                self._store_damaged(exc)
                del self._subs[key]
                self._reply(sock, sub.peer, pm.error(ErrorCode.INTERNAL, str(exc), job_id=sub.job_id))
                continue
            for event in events:
                if not self._send_event(sock, sub, event):
                    break

    def _store_damaged(self, exc: StoreDamaged) -> None:
        if exc.damage not in self._damage:
            self._damage.append(exc.damage)
            log.error("%s", exc)

    # 4b. Keys and retention ---------------------------------------------------------------------

    def _watch_keys(self, sock: ServerSocket) -> None:
        """Reload the authorised keys on SIGHUP or when `authorized_clients/` changed."""
        if self.config.keys_dir is None:
            return
        now = time.monotonic()
        if not self._reload_keys.is_set() and now < self._next_keys_check:
            return
        self._next_keys_check = now + KEYS_CHECK_S
        folder = authorized_dir(self.config.keys_dir)
        try:
            seen = tuple(sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                                for entry in os.scandir(folder)))
        except OSError as exc:
            seen = (str(exc),)
        if seen == self._keys_seen and not self._reload_keys.is_set():
            return
        self._reload_keys.clear()
        first = not self._keys_seen
        self._keys_seen = seen
        try:
            sock.reload_authorized()
        except (OSError, ValueError) as exc:
            self._problems["keys"] = f"the authorised keys cannot be reloaded from {folder}: {_one_line(exc)}"
            log.error("%s", self._problems["keys"])
            return
        self._problems.pop("keys", None)
        if not first:
            log.info("authorised keys reloaded: %d keys", len(sock.authorized))

    def _retention(self) -> None:
        """Remove finished jobs that ended more than `keep_days` ago (hourly, and at start)."""
        now = time.monotonic()
        if self.config.keep_days <= 0 or now < self._next_retention:
            return
        self._next_retention = now + RETENTION_EVERY_S
        for job_id in self.store.expired(time.time() - self.config.keep_days * 86400):
            self.store.mark_deleted(job_id)
            self._drop_subscriptions(job_id)
            self.store.purge(job_id)
            log.info("job %s removed: it ended more than %g days ago (--keep-days)", job_id, self.config.keep_days)

    def _send_progress(self, sock: ServerSocket) -> None:
        with self._outbox.lock:
            pending, self._outbox.progress = self._outbox.progress, {}
        for job_id, (body, buffers) in pending.items():
            msg = Message(type=MessageType.PROGRESS, body=body, buffers=buffers, job_id=job_id)
            for sub in [s for s in self._subs.values() if s.job_id == job_id and s.failing_since is None]:
                sock.send(sub.peer, msg)  # progress is not kept: a failed send drops it

    # 5. The worker -------------------------------------------------------------------------------

    def _work_loop(self, worker: JobWorker) -> None:
        unfinished: dict[str, tuple[str, str | None]] = {}  # job_id -> its end, not stored yet
        wait_s = STORE_RETRY_S[0]
        name = worker.info.name
        problem_key = f"worker {name}"  # its own line in `degraded`, as when it leaves the pool
        while not self._shutdown.is_set():
            try:
                # 1. While the store cannot be written (a full disk), wait and try again.
                if "store" in self._problems:
                    self._probe_store()
                # 2. Store the ends of jobs that could not be stored before; run the next job.
                for job_id, (state, reason) in list(unfinished.items()):
                    self._finish(job_id, state, reason)
                    del unfinished[job_id]
                if not self._work_once(worker, unfinished):
                    self._remove_worker(worker, problem_key)
                    return
                wait_s = STORE_RETRY_S[0]
                self._problems.pop(problem_key, None)
            except Exception as exc:  # the store failed under the worker: report, wait, go on
                log.exception("worker %s could not use the store; it tries again in %.0f s", name, wait_s)
                self._problems[problem_key] = (f"worker {name} cannot use the store: "
                                               f"{type(exc).__name__}: {_one_line(exc)}")
                self._note_store_failure(exc)
                self._shutdown.wait(wait_s)
                wait_s = min(2 * wait_s, STORE_RETRY_S[1])

    def _probe_store(self) -> None:
        """Raise while a small write to the store still fails; clear the problem once it works."""
        probe = self.config.store_dir / ".write-probe"  # workers share it: each writes its own temp file
        write_file_atomic(probe, bytes(64 * 2**10))
        probe.unlink(missing_ok=True)
        problem = self._problems.pop("store", None)
        if problem is not None:
            log.info("the store can be written again: %s", problem)

    def _work_once(self, worker: JobWorker, unfinished: dict[str, tuple[str, str | None]]) -> bool:
        """Run the next job, if any, on `worker`; False when the worker died for good."""
        # 1. Take the next job; sleep until a submit wakes us when there is none.
        hooks = JobHooks(on_event=self._publish, on_progress=self._publish_progress, shutdown=self._shutdown)
        with self._current_lock:  # claim and become running at once (see _cancel, _delete_job)
            claimed = self.store.claim_next(self._pick_fairly)
            if claimed is not None:
                mine = self._running[claimed[0].job_id] = RunningJob(hooks, worker.info, claimed[0].owner)
                self._served[claimed[0].owner] = time.monotonic()
        if claimed is None:
            self._work.wait(1.0)
            self._work.clear()
            return True
        # 2. Run it; a stop interrupts it and leaves it `running` for the next start; a worker
        #    that dies hands it back to resume on the next free one.
        record, resumed = claimed
        lost = False
        try:
            outcome = self._run_job(record, resumed, hooks, worker)
        except WorkerLost as exc:
            outcome, lost = self._worker_lost(record.job_id, worker, hooks, exc), True
        except Exception as exc:  # a fault of the server around the job, not of the runner
            log.exception("job %s: the worker failed", record.job_id)
            outcome = Outcome("failed", f"the server failed running this job: {type(exc).__name__}: {_one_line(exc)}")
            self._note_store_failure(exc)
        finally:
            with self._current_lock:  # a job handed back may already run on another worker: not its entry
                if self._running.get(record.job_id) is mine:
                    del self._running[record.job_id]
        # 3. Store and send how it ended (nothing when interrupted: it resumes).
        if outcome.state is not None:
            self._losses.pop(record.job_id, None)
            unfinished[record.job_id] = (outcome.state, outcome.reason)
            self._finish(record.job_id, outcome.state, outcome.reason)
            del unfinished[record.job_id]
        # 4. A lost worker restarts (minutes, for a model load) once its job is settled.
        return worker.recover() if lost else True

    def _pick_fairly(self, heads: list[QueuedHead]) -> str:
        """The queued job to run next, of the owners' oldest ones: the owner with the fewest
        running jobs, then the one served longest ago, then the oldest job. The caller holds
        `_current_lock`."""
        running = collections.Counter(job.owner for job in self._running.values())
        return min(heads, key=lambda head: (running[head.owner], self._served.get(head.owner, 0.0), head.order_no)).job_id

    def _worker_lost(self, job_id: str, worker: JobWorker, hooks: JobHooks, exc: WorkerLost) -> Outcome:
        """The job's worker died: resume the job elsewhere, or fail it when that happened twice
        in a row; a job cancelled (or deleted) meanwhile ends cancelled, one the stop asked to
        pause stays running for the next start."""
        log.error("job %s: worker %s died under it: %s", job_id, worker.info.name, exc)
        if hooks.cancel.is_set():
            return Outcome("cancelled")
        if hooks.shutdown.is_set():
            return Outcome(None)
        lost = self._losses.setdefault(job_id, [])
        lost.append(worker.info.name)
        if len(lost) >= MAX_WORKER_LOSSES:
            return Outcome("failed", f"the workers running this job died {len(lost)} times in a row "
                                     f"({', '.join(lost)}); it is not tried again: {_one_line(exc)}")
        self.store.resume_later(job_id)
        self._work.set()
        return Outcome(None)

    def _remove_worker(self, worker: JobWorker, problem_key: str) -> None:
        """Take a worker that cannot serve again out of the pool (its line in `degraded`, under
        the key its loop started with, replaces any store problem of its own); the others go on."""
        self.workers = [other for other in self.workers if other is not worker]
        self._problems[problem_key] = f"worker {worker.info.name} left the pool: {worker.problem}"
        log.error("%s; %d workers serve", self._problems[problem_key], len(self.workers))
        if not self.workers:
            self.runner_missing = "every worker left the pool (the server's log says why)"

    def _note_store_failure(self, exc: BaseException) -> None:
        """A job that failed on a write (a full disk) marks the store as failing: the worker
        waits for it to be writable before it takes the next job."""
        if isinstance(exc, StoreDamaged):
            self._store_damaged(exc)
        elif isinstance(exc, (OSError, sqlite3.Error)):
            self._problems["store"] = f"writing the store failed: {type(exc).__name__}: {_one_line(exc)}"

    def _run_job(self, record: JobRecord, resumed: bool, hooks: JobHooks, worker: JobWorker) -> Outcome:
        from protocol.params import validate_submit

        job_id = record.job_id
        # 1. Announce it, rebuild the typed params and the inputs from the store.
        body: dict[str, Any] = {"event": "state", "state": "running"}
        if resumed:
            body["resumed"] = True
        announced = self.store.append_event(job_id, body)
        self._publish(announced)
        log.info("job %s %s on %s", job_id, "resumes from its newest checkpoint" if resumed else "started",
                 worker.info.name)
        inputs = self.store.load_inputs(job_id)
        params = validate_submit(record.kind, record.params, inputs)
        ctx = JobContext(job_id=job_id, kind=record.kind, params=params, inputs=inputs,
                         resumed=resumed, store=self.store, hooks=hooks)
        # 2. Run it and turn the way it ended into the job's last state.
        outcome = worker.execute(ctx, dataclasses.replace(record, last_seq=announced.seq))
        if outcome.error is not None:
            self._note_store_failure(outcome.error)
        return outcome

    def _finish(self, job_id: str, state: str, reason: str | None) -> None:
        if self.store.is_deleted(job_id):
            self.store.purge(job_id)
            log.info("job %s ended %s and was deleted", job_id, state)
            return
        job = self.store.get_job(job_id)
        if job is None or job.state in FINISHED_STATES:
            return
        body = {"event": "state", "state": state}
        if reason is not None:
            body["error"] = reason
        self._publish(self.store.append_event(job_id, body, state=state, error=reason))
        self.store.fold_log()
        log.info("job %s %s%s", job_id, state, f": {reason}" if reason else "")


def _owner(incoming: Incoming) -> str:
    """The owner a job submitted by this client gets: its public key, "" without keys."""
    return incoming.client_key or ""


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    """An optional integer request field in [low, high]; ProtocolError names it."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _raise_descriptor_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the new soft limit
    (a large number where there is no such limit, as on Windows)."""
    try:
        import resource
    except ImportError:
        return 2**16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def serve(config: ServerConfig, runner: JobRunner | None, runner_missing: str | None = None,
          workers: list[JobWorker] | None = None) -> int:
    """Run a server in this thread until SIGINT/SIGTERM; returns the exit status. `workers`
    (the Ray workers of backend.cluster) replace the one in-process worker of `runner`."""
    if config.insecure and config.keys_dir is None and not is_loopback(config.bind):
        log.warning("INSECURE: %s accepts unencrypted, unauthenticated clients (--insecure)", config.bind)
    if runner is None and not workers:
        log.warning("no job runner: %s; submits will be refused", runner_missing)
    server = Server(config, runner, runner_missing, workers)
    previous = {sig: signal.signal(sig, lambda signum, frame: server.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGHUP"):  # not on Windows; the folder watch reloads keys there too
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_keys())
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

"""The backend server: one ROUTER socket, the job store, one worker thread running jobs.

Threads:

- the main loop (`Server.run`) is the only thread that touches the ROUTER socket. It answers
  requests, keeps the subscriptions and sends events and progress;
- the worker thread runs one job at a time with the runner. Whatever it reports is stored first
  (events), then handed to the main loop through a thread-safe queue and a wake-up message on an
  inproc PAIR socket, so the loop sleeps in `poll` while idle and sends within a millisecond.

A subscription remembers the seq of the last event it sent (`sent_seq`). Live events go out only
when they are exactly the next one; anything else (a subscriber that is behind, a send that
failed) is caught up from the store, so each subscriber gets every event once, in order.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from backend.jobs import JobCancelled, JobContext, JobFailed, JobHooks, JobInterrupted, JobRunner
from backend.store import FINISHED_STATES, JobRecord, JobStore, StoredEvent
from protocol import messages as pm
from protocol.codec import ProtocolError
from protocol.messages import ErrorCode, Message, MessageType
from protocol.transport import Incoming, ServerSocket, is_loopback

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


def load_runner(models: str, device: str) -> tuple[JobRunner | None, str | None]:
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
    return pipeline.make_runner(models=models, device=device), None


class Server:
    """The server loop, its store and its worker (see the module docstring)."""

    def __init__(self, config: ServerConfig, runner: JobRunner | None, runner_missing: str | None = None) -> None:
        if runner is None and not runner_missing:
            raise ValueError("runner_missing must say why there is no runner")
        self.config = config
        self.runner = runner
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
        self._current: tuple[str, JobHooks] | None = None
        self._current_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        self._zctx = zmq.Context()
        self._wake_rx = self._zctx.socket(zmq.PAIR)
        self._wake_tx = self._zctx.socket(zmq.PAIR)
        self._worker: threading.Thread | None = None
        self._sock: ServerSocket = None
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
            )
            self._sock = sock
            self.bound_address = sock.bound_address
            if self.runner is not None:
                self._worker = threading.Thread(target=self._work_loop, name="dreamloom-worker", daemon=True)
                self._worker.start()
            log.info("listening on %s (store %s)", self.bound_address, self.config.store_dir)
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
        if self._worker is not None:
            self._worker.join(WORKER_JOIN_S)
            if self._worker.is_alive():
                log.warning("the running job did not stop within %.0f s; it resumes at the next start", WORKER_JOIN_S)

    # 2. The main loop -------------------------------------------------------------------------

    def _loop(self, sock: ServerSocket) -> None:
        poller = zmq.Poller()
        poller.register(sock.socket, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            # 1. Sleep until a request, a wake-up from the worker, or the next retry.
            ready = dict(poller.poll(self._poll_timeout_ms()))
            # 2. Drain wake-ups (one is enough to look at the outbox).
            if self._wake_rx in ready:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            # 3. Answer every request that is waiting.
            if sock.socket in ready:
                self._serve_requests(sock)
            # 4. Send what the worker stored, then catch up subscribers that are behind.
            self._send_events(sock)
            self._send_progress(sock)
            self._catch_up(sock)

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

    def _answer(self, incoming: Incoming) -> Message | None:
        """The reply to one received message; never raises."""
        if incoming.error is not None:
            return incoming.error.to_message()
        request: Message = incoming.message
        try:
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
        return pm.reply_to(request, MessageType.WELCOME, {
            "server_version": SERVER_VERSION,
            "protocol": pm.PROTOCOL_VERSION,
            "device": self.runner.device if self.runner is not None else self.config.device,
            "models": dict(self.runner.models) if self.runner is not None else {},
            "max_message_bytes": self._sock.max_message_bytes,
            "heartbeat_ms": self._sock.heartbeat_ms,
        })

    def _submit(self, incoming: Incoming, request: Message) -> Message:
        from protocol.params import params_to_dict, validate_submit

        kind = request.body.get("kind")
        params = validate_submit(kind, request.body.get("params"), request.buffers)
        if self.runner is None:
            raise ProtocolError(ErrorCode.INTERNAL, self.runner_missing or "no runner")
        params_dict = params_to_dict(params)
        created = self.store.create_job(
            owner=_owner(incoming), kind=kind, prompt=str(params_dict.get("prompt", "")),
            params=params_dict, inputs=dict(request.buffers), max_queued=self.config.max_queue,
        )
        if created is None:
            raise ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"{self.config.max_queue} jobs are already waiting (the server's --max-queue); try again later",
            )
        record, queued = created
        position = queued.body["position"]
        self._subs[(incoming.peer, record.job_id)] = Subscription(incoming.peer, record.job_id, sent_seq=0)
        self._publish(queued)
        self._work.set()
        log.info("job %s queued (%s, position %d)", record.job_id, kind, position)
        reply = pm.reply_to(request, MessageType.ACCEPTED, {"job_id": record.job_id, "position": position})
        reply.job_id = record.job_id
        return reply

    def _cancel(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        with self._current_lock:  # the worker claims jobs under this lock too
            cancelled = self.store.cancel_if_queued(job.job_id)
            if cancelled is None:
                self._request_cancel(job.job_id)
        if cancelled is not None:
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
        self._subs[(incoming.peer, job.job_id)] = sub
        reply = pm.reply_to(request, MessageType.SUBSCRIBED, {"job_id": job.job_id, "last_seq": job.last_seq})
        reply.job_id = job.job_id
        return reply

    def _unsubscribe(self, incoming: Incoming, request: Message) -> Message:
        job = self._visible_job(incoming, request)
        self._subs.pop((incoming.peer, job.job_id), None)
        return pm.reply_to(request, MessageType.UNSUBSCRIBED, {"job_id": job.job_id})

    def _list_jobs(self, incoming: Incoming, request: Message) -> Message:
        jobs = self.store.list_jobs(owner=_owner(incoming))
        return pm.reply_to(request, MessageType.JOBS, {"jobs": [job.listing() for job in jobs]})

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
        with self._current_lock:  # the worker claims jobs under this lock too
            self.store.mark_deleted(job.job_id)
            running = self._request_cancel(job.job_id)
        for key in [key for key in self._subs if key[1] == job.job_id]:
            del self._subs[key]
        if not running:
            self.store.purge(job.job_id)  # nothing else holds its files; else the worker purges
        log.info("job %s deleted", job.job_id)
        return pm.reply_to(request, MessageType.DELETED, {"job_id": job.job_id})

    def _ping(self, incoming: Incoming, request: Message) -> Message:
        return pm.reply_to(request, MessageType.PONG)

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
        if self._current is None or self._current[0] != job_id:
            return False
        self._current[1].cancel.set()
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
            for event in self.store.events_after(sub.job_id, sub.sent_seq):
                if not self._send_event(sock, sub, event):
                    break

    def _send_progress(self, sock: ServerSocket) -> None:
        with self._outbox.lock:
            pending, self._outbox.progress = self._outbox.progress, {}
        for job_id, (body, buffers) in pending.items():
            msg = Message(type=MessageType.PROGRESS, body=body, buffers=buffers, job_id=job_id)
            for sub in [s for s in self._subs.values() if s.job_id == job_id and s.failing_since is None]:
                sock.send(sub.peer, msg)  # progress is not kept: a failed send drops it

    # 5. The worker -------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._shutdown.is_set():
            # 1. Take the next job; sleep until a submit wakes us when there is none.
            hooks = JobHooks(on_event=self._publish, on_progress=self._publish_progress, shutdown=self._shutdown)
            with self._current_lock:  # claim and become current at once (see _cancel, _delete_job)
                claimed = self.store.claim_next()
                if claimed is not None:
                    self._current = (claimed[0].job_id, hooks)
            if claimed is None:
                self._work.wait(1.0)
                self._work.clear()
                continue
            # 2. Run it; a stop interrupts it and leaves it `running` for the next start.
            record, resumed = claimed
            try:
                state, reason = self._run_job(record, resumed, hooks)
            except Exception:  # a fault of the server around the job, not of the runner
                log.exception("job %s: the worker failed", record.job_id)
                state, reason = "failed", "the server failed running this job (see its log)"
            finally:
                with self._current_lock:
                    self._current = None
            # 3. Store and send how it ended (nothing when interrupted: it resumes next start).
            if state is not None:
                self._finish(record.job_id, state, reason)

    def _run_job(self, record: JobRecord, resumed: bool, hooks: JobHooks) -> tuple[str | None, str | None]:
        from protocol.params import validate_submit

        job_id = record.job_id
        # 1. Announce it, rebuild the typed params and the inputs from the store.
        body: dict[str, Any] = {"event": "state", "state": "running"}
        if resumed:
            body["resumed"] = True
        self._publish(self.store.append_event(job_id, body))
        log.info("job %s %s", job_id, "resumes from its newest checkpoint" if resumed else "started")
        inputs = self.store.load_inputs(job_id)
        params = validate_submit(record.kind, record.params, inputs)
        ctx = JobContext(job_id=job_id, kind=record.kind, params=params, inputs=inputs,
                         resumed=resumed, store=self.store, hooks=hooks)
        # 2. Run it and turn the way it ended into the job's last state.
        return self._outcome(ctx)

    def _outcome(self, ctx: JobContext) -> tuple[str | None, str | None]:
        """(final state, reason) of running the job; (None, None) when the stop interrupted it."""
        assert self.runner is not None
        try:
            self.runner.run(ctx)
        except JobInterrupted:
            log.info("job %s interrupted by the stop; it resumes at the next start", ctx.job_id)
            return None, None
        except JobCancelled:
            return "cancelled", None
        except Exception as exc:
            log.error("job %s failed:\n%s", ctx.job_id, traceback.format_exc())
            if isinstance(exc, JobFailed):
                return "failed", _one_line(exc)
            return "failed", f"{type(exc).__name__}: {_one_line(exc)}"
        if not ctx.has_result:
            return "failed", "the runner returned without handing over the final GLB (ctx.set_result)"
        if not ctx.final_mesh_emitted:
            return "failed", "the runner returned without emitting a final mesh event"
        return "done", None

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
        log.info("job %s %s%s", job_id, state, f": {reason}" if reason else "")


def _owner(incoming: Incoming) -> str:
    """The owner a job submitted by this client gets: its public key, "" without keys."""
    return incoming.client_key or ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def serve(config: ServerConfig, runner: JobRunner | None, runner_missing: str | None = None) -> int:
    """Run a server in this thread until SIGINT/SIGTERM; returns the exit status."""
    if config.insecure and config.keys_dir is None and not is_loopback(config.bind):
        log.warning("INSECURE: %s accepts unencrypted, unauthenticated clients (--insecure)", config.bind)
    if runner is None:
        log.warning("no job runner: %s; submits will be refused", runner_missing)
    server = Server(config, runner, runner_missing)
    previous = {sig: signal.signal(sig, lambda signum, frame: server.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

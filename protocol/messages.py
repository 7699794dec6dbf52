"""Names of the Dreamloom wire protocol (PROTOCOL.md) and the `Message` type.

Everything a reader needs to know about what travels over the wire is in this one module: the tag,
the version, the message types and which reply answers which request, the error codes, the event
kinds, job states, stages and job kinds. The byte layout lives in `codec.py`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np

TAG: Final = b"DLOOM1"
"""Frame 0 of every message."""
PROTOCOL_VERSION: Final = 1
"""The `protocol` number sent in `hello` and `welcome`."""
DEFAULT_MAX_MESSAGE_BYTES: Final = 512 * 2**20
"""Largest whole message (all frames) unless `welcome` says otherwise."""
DEFAULT_HEARTBEAT_MS: Final = 2000
"""Transport heartbeat interval both sides use unless told otherwise."""
MAX_ERROR_MESSAGE_CHARS: Final = 1000
"""Longest `message` of an `error` body; a longer one is cut (values a client sent are echoed)."""
MAX_ERROR_FIELD_CHARS: Final = 200
"""Longest `field` of an `error` body."""


class MessageType:
    """Values of the header field `type`."""

    HELLO: Final = "hello"
    WELCOME: Final = "welcome"
    SUBMIT: Final = "submit"
    ACCEPTED: Final = "accepted"
    CANCEL: Final = "cancel"
    CANCELLED: Final = "cancelled"
    SUBSCRIBE: Final = "subscribe"
    SUBSCRIBED: Final = "subscribed"
    UNSUBSCRIBE: Final = "unsubscribe"
    UNSUBSCRIBED: Final = "unsubscribed"
    LIST_JOBS: Final = "list_jobs"
    JOBS: Final = "jobs"
    GET_RESULT: Final = "get_result"
    RESULT: Final = "result"
    DELETE_JOB: Final = "delete_job"
    DELETED: Final = "deleted"
    PING: Final = "ping"
    PONG: Final = "pong"
    ERROR: Final = "error"
    EVENT: Final = "event"
    PROGRESS: Final = "progress"


REPLY_FOR: Final[dict[str, str]] = {
    MessageType.HELLO: MessageType.WELCOME,
    MessageType.SUBMIT: MessageType.ACCEPTED,
    MessageType.CANCEL: MessageType.CANCELLED,
    MessageType.SUBSCRIBE: MessageType.SUBSCRIBED,
    MessageType.UNSUBSCRIBE: MessageType.UNSUBSCRIBED,
    MessageType.LIST_JOBS: MessageType.JOBS,
    MessageType.GET_RESULT: MessageType.RESULT,
    MessageType.DELETE_JOB: MessageType.DELETED,
    MessageType.PING: MessageType.PONG,
}
"""Request type -> the type of its successful reply (any request may get `error` instead)."""

REQUEST_TYPES: Final = frozenset(REPLY_FOR)
"""Types a client sends."""
REPLY_TYPES: Final = frozenset(REPLY_FOR.values()) | {MessageType.ERROR}
"""Types that answer one request (header `reply_to` set)."""
ALL_TYPES: Final = REQUEST_TYPES | REPLY_TYPES | {MessageType.EVENT, MessageType.PROGRESS}
"""Every type version 1 knows; `decode` refuses any other."""


class ErrorCode:
    """Values of `code` in an `error` body."""

    BAD_MESSAGE: Final = "bad_message"
    BAD_PARAMS: Final = "bad_params"
    UNSUPPORTED_PROTOCOL: Final = "unsupported_protocol"
    UNKNOWN_JOB: Final = "unknown_job"
    NOT_READY: Final = "not_ready"
    QUEUE_FULL: Final = "queue_full"
    UNAUTHORIZED: Final = "unauthorized"
    INTERNAL: Final = "internal"


ERROR_CODES: Final = frozenset(
    v for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, str)
)


class EventKind:
    """Values of `event` in an `event` body."""

    STATE: Final = "state"
    STAGE: Final = "stage"
    MESH: Final = "mesh"
    NOTE: Final = "note"


class JobState:
    """Values of `state` in a `state` event and in `jobs` entries."""

    QUEUED: Final = "queued"
    RUNNING: Final = "running"
    DONE: Final = "done"
    FAILED: Final = "failed"
    CANCELLED: Final = "cancelled"


FINAL_STATES: Final = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
"""A job's last event is a `state` event with one of these."""


class Stage:
    """Pipeline stages, in the order they run."""

    COARSE: Final = "coarse"
    GEOMETRY: Final = "geometry"
    TEXTURE: Final = "texture"


STAGES: Final = (Stage.COARSE, Stage.GEOMETRY, Stage.TEXTURE)


class JobKind:
    """Values of `kind` in a `submit` body."""

    GENERATE: Final = "generate"
    REFINE_TEXTURE: Final = "refine_texture"


JOB_KINDS: Final = (JobKind.GENERATE, JobKind.REFINE_TEXTURE)

BUFFER_DTYPES: Final[dict[str, np.dtype | None]] = {
    "u1": np.dtype("<u1"),
    "i4": np.dtype("<i4"),
    "u4": np.dtype("<u4"),
    "f2": np.dtype("<f2"),
    "f4": np.dtype("<f4"),
    "bytes": None,
}
"""Buffer dtype names -> little-endian numpy dtype (`bytes`: an encoded file, kept as bytes)."""


def new_msg_id() -> str:
    """A fresh message id: 32 lowercase hex characters from the OS random source."""
    return os.urandom(16).hex()


BufferValue = np.ndarray | bytes | bytearray | memoryview
"""A buffer: a numpy array of a `BUFFER_DTYPES` dtype, or the bytes of an encoded file."""


@dataclass
class Message:
    """One protocol message, header fields flattened, body and buffers apart."""

    type: str
    """Header `type`: one of `MessageType`."""
    body: dict = field(default_factory=dict)
    """The body map (str keys, msgpack-able values)."""
    buffers: dict[str, BufferValue] = field(default_factory=dict)
    """Frames 3… by name, in order; numpy arrays (u1 i4 u4 f2 f4) or bytes (dtype `bytes`)."""
    job_id: str | None = None
    """Header `job_id`: the job this message concerns."""
    seq: int | None = None
    """Header `seq`: on `event` messages, the event's number in its job (1, 2, 3…)."""
    reply_to: str | None = None
    """Header `reply_to`: on replies, the `msg_id` of the request answered."""
    msg_id: str = field(default_factory=new_msg_id)
    """Header `msg_id`: 32 lowercase hex characters."""
    sent_at: float = field(default_factory=time.time)
    """Header `sent_at`: the sender's Unix time in seconds."""


def reply_to(
    request: Message,
    type: str,
    body: dict | None = None,
    buffers: dict[str, BufferValue] | None = None,
) -> Message:
    """A reply to `request`: `reply_to` is the request's `msg_id`, `job_id` is carried over."""
    return Message(
        type=type,
        body=dict(body or {}),
        buffers=dict(buffers or {}),
        job_id=request.job_id,
        reply_to=request.msg_id,
    )


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error(
    code: str,
    message: str,
    field: str | None = None,
    reply_to: str | None = None,
    job_id: str | None = None,
) -> Message:
    """An `error` message; `field` is the dotted path of the offending field where one is at fault."""
    if code not in ERROR_CODES:
        raise ValueError(f"error code must be one of {sorted(ERROR_CODES)}, got {code!r}")
    return Message(
        type=MessageType.ERROR,
        body={
            "code": code,
            "message": clip(message, MAX_ERROR_MESSAGE_CHARS),
            "field": None if field is None else clip(field, MAX_ERROR_FIELD_CHARS),
        },
        job_id=job_id,
        reply_to=reply_to,
    )

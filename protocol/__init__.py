"""Dreamloom wire protocol, version 1 (PROTOCOL.md): messages, codec, params, transport, keys.

Pure Python (pyzmq, msgpack, numpy); imported by the backend and bundled in the Blender extension.
"""

from .codec import ProtocolError, decode, encode
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REPLY_FOR,
    TAG,
    ErrorCode,
    EventKind,
    JobKind,
    JobState,
    Message,
    MessageType,
    Stage,
    error,
    new_msg_id,
    reply_to,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REPLY_FOR",
    "TAG",
    "ErrorCode",
    "EventKind",
    "JobKind",
    "JobState",
    "Message",
    "MessageType",
    "ProtocolError",
    "Stage",
    "decode",
    "encode",
    "error",
    "new_msg_id",
    "reply_to",
]

"""Frames <-> `Message` (PROTOCOL.md section 2), with every receive-side limit enforced.

Frames: ``[TAG, header, body, buffer...]``; header and body are msgpack maps. `decode` raises
`ProtocolError` and nothing else, whatever bytes arrive. Numpy buffers are zero-copy both ways:
`encode` hands out memoryviews of C-contiguous arrays, `decode` wraps frames with `np.frombuffer`
(read-only arrays that keep the frame alive).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from .messages import (
    ALL_TYPES,
    BUFFER_DTYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    TAG,
    BufferValue,
    ErrorCode,
    Message,
    error,
)

MAX_HEADER_BODY_BYTES = 2**20
"""Header frame plus body frame, in bytes."""
MAX_NESTING = 8
"""Containers (maps and lists) nested in a header or body; the header/body map itself is level 1."""
MAX_STRING_CHARS = 4096
"""Every string (and map key) in a header or body, in characters; also the longest `bin` value."""
MAX_BUFFERS = 16
"""Buffer frames per message."""
MAX_BUFFER_NDIM = 8
"""Entries in a buffer's `shape`."""
MAX_BUFFER_DIM = 2**31 - 1
"""Largest entry of a buffer's `shape` (also when another entry is 0 and the buffer is empty)."""

_MSG_ID_RE = re.compile(r"[0-9a-f]{32}")
_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=False,
    use_list=True,
    max_str_len=4 * MAX_STRING_CHARS,  # bytes; characters are counted after decoding
    max_bin_len=MAX_STRING_CHARS,
    max_array_len=MAX_HEADER_BODY_BYTES,
    max_map_len=MAX_HEADER_BODY_BYTES,
    max_ext_len=0,  # no extension types at all
)


class ProtocolError(Exception):
    """A message that breaks the protocol; becomes an `error` reply via `to_message`."""

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        super().__init__(message if field is None else f"{message} (field {field})")
        self.code = code
        """One of `ErrorCode`."""
        self.message = message
        """One sentence a person can act on."""
        self.field = field
        """Dotted path of the offending field, or None."""
        self.reply_to = reply_to
        """The offending request's `msg_id` when its header was readable, else None."""

    def to_message(self, job_id: str | None = None) -> Message:
        """The `error` reply for this fault."""
        return error(self.code, self.message, self.field, reply_to=self.reply_to, job_id=job_id)


# ---------------------------------------------------------------------------------------------
# encode


def _pack_default(value: Any) -> Any:
    """msgpack fallback: numpy scalars become Python numbers; anything else is refused."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode a {type(value).__name__} in a message header or body")


def _array_frame(name: str, array: np.ndarray) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, zero-copy byte view) of a numpy buffer."""
    for dtype_name, dtype in BUFFER_DTYPES.items():
        if dtype is not None and array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            contiguous = array.astype(dtype, order="C", copy=False)  # no copy when already fine
            return dtype_name, list(contiguous.shape), memoryview(contiguous.reshape(-1).view(np.uint8))
    raise ValueError(
        f"buffer {name!r} has dtype {array.dtype}; allowed: u1 i4 u4 f2 f4 arrays or bytes"
    )


def _bytes_frame(name: str, value: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(value)
    if not view.c_contiguous:
        raise ValueError(f"buffer {name!r} is a non-contiguous memoryview")
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames of `msg`: TAG, header, body, buffers. Raises ValueError for a message no peer accepts."""
    if msg.type not in ALL_TYPES:
        raise ValueError(f"message type {msg.type!r} is not a protocol 1 type")
    if len(msg.buffers) > MAX_BUFFERS:
        raise ValueError(f"{len(msg.buffers)} buffers; at most {MAX_BUFFERS} are allowed")
    # 1. Buffers: descriptors and zero-copy frames.
    descriptors: list[dict[str, Any]] = []
    buffer_frames: list[bytes | memoryview] = []
    for name, value in msg.buffers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"buffer names must be non-empty strings, got {name!r}")
        if isinstance(value, np.ndarray):
            dtype_name, shape, frame = _array_frame(name, value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            frame = value if isinstance(value, bytes) else _bytes_frame(name, value)
            dtype_name, shape = "bytes", [len(frame) if isinstance(frame, bytes) else frame.nbytes]
        else:
            raise ValueError(
                f"buffer {name!r} is a {type(value).__name__}; expected a numpy array or bytes"
            )
        nbytes = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        descriptors.append({"name": name, "dtype": dtype_name, "shape": shape, "nbytes": nbytes})
        buffer_frames.append(frame)
    # 2. Header and body maps, checked against the limits the receiver enforces.
    header = {
        "type": msg.type,
        "msg_id": msg.msg_id,
        "reply_to": msg.reply_to,
        "job_id": msg.job_id,
        "seq": msg.seq,
        "sent_at": float(msg.sent_at),
        "buffers": descriptors,
    }
    try:
        header_bytes = msgpack.packb(header, use_bin_type=True, default=_pack_default)
        body_bytes = msgpack.packb(msg.body, use_bin_type=True, default=_pack_default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode {msg.type}: {exc}") from None
    if len(header_bytes) + len(body_bytes) > MAX_HEADER_BODY_BYTES:
        raise ValueError(
            f"{msg.type} header plus body is {len(header_bytes) + len(body_bytes)} bytes; "
            f"at most {MAX_HEADER_BODY_BYTES} are allowed (send large data as buffers)"
        )
    try:
        _check_header(msgpack.unpackb(header_bytes, **_UNPACK_LIMITS), None)
        _check_tree(msgpack.unpackb(body_bytes, **_UNPACK_LIMITS), "", 1, None)
    except ProtocolError as exc:
        raise ValueError(f"cannot encode {msg.type}: {exc}") from None
    return [TAG, header_bytes, body_bytes, *buffer_frames]


# ---------------------------------------------------------------------------------------------
# decode


def _bad(message: str, field: str | None = None, reply_to: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message, field, reply_to)


def _frame_view(index: int, frame: Any) -> memoryview:
    """A flat byte view of one received frame."""
    if isinstance(frame, zmq.Frame):
        view = frame.buffer
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        view = memoryview(frame)
    else:
        raise _bad(f"frame {index} is a {type(frame).__name__}, not bytes")
    if view.ndim != 1 or view.format != "B":
        if not view.c_contiguous:
            raise _bad(f"frame {index} is not contiguous")
        view = view.cast("B")
    return view


def _join(path: str, key: str) -> str:
    return key if not path else f"{path}.{key}"


def _check_tree(value: Any, path: str, depth: int, reply_to: str | None) -> None:
    """Nesting, key type and string length limits over a decoded header or body."""
    if isinstance(value, (dict, list)) and depth > MAX_NESTING:
        raise _bad(f"containers are nested more than {MAX_NESTING} deep", path or None, reply_to)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(f"map key {key!r} is a {type(key).__name__}; keys must be strings", path or None, reply_to)
            if len(key) > MAX_STRING_CHARS:
                raise _bad(f"a map key is {len(key)} characters; at most {MAX_STRING_CHARS}", path or None, reply_to)
            _check_tree(item, _join(path, key), depth + 1, reply_to)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_tree(item, f"{path}[{index}]", depth + 1, reply_to)
    elif isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise _bad(f"string of {len(value)} characters; at most {MAX_STRING_CHARS} are allowed", path or None, reply_to)
    elif value is None or isinstance(value, (bool, int, float, bytes)):
        return
    else:
        raise _bad(f"unsupported msgpack value of type {type(value).__name__}", path or None, reply_to)


def _unpack_map(view: memoryview, what: str, reply_to: str | None) -> dict:
    try:
        value = msgpack.unpackb(view, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ExtraData...
        raise _bad(f"the {what} frame is not valid msgpack within the limits: {exc}", what, reply_to) from None
    if not isinstance(value, dict):
        raise _bad(f"the {what} frame is a msgpack {type(value).__name__}, not a map", what, reply_to)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(header: dict, reply_to: str | None) -> None:
    """Presence and type of every header field (the buffer list's entries are checked later)."""
    _check_tree(header, "header", 1, reply_to)
    for name in ("type", "msg_id", "reply_to", "job_id", "seq", "sent_at", "buffers"):
        if name not in header:
            raise _bad(f"the header has no {name!r} field", f"header.{name}", reply_to)
    msg_id = header["msg_id"]
    if not isinstance(msg_id, str) or not _MSG_ID_RE.fullmatch(msg_id):
        raise _bad(f"msg_id {msg_id!r} is not 32 lowercase hex characters", "header.msg_id", reply_to)
    if not isinstance(header["type"], str) or header["type"] not in ALL_TYPES:
        raise _bad(f"unknown message type {header['type']!r}", "header.type", reply_to)
    ref = header["reply_to"]
    if ref is not None and (not isinstance(ref, str) or not _MSG_ID_RE.fullmatch(ref)):
        raise _bad(f"reply_to {ref!r} is neither nil nor 32 lowercase hex characters", "header.reply_to", reply_to)
    job_id = header["job_id"]
    if job_id is not None and (not isinstance(job_id, str) or not job_id):
        raise _bad(f"job_id {job_id!r} is neither nil nor a non-empty string", "header.job_id", reply_to)
    seq = header["seq"]
    if seq is not None and (not _is_int(seq) or seq < 1):
        raise _bad(f"seq {seq!r} is neither nil nor an integer >= 1", "header.seq", reply_to)
    sent_at = header["sent_at"]
    if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool) or not math.isfinite(sent_at):
        raise _bad(f"sent_at {sent_at!r} is not a finite number of seconds", "header.sent_at", reply_to)
    if not isinstance(header["buffers"], list):
        raise _bad("header.buffers is not a list", "header.buffers", reply_to)
    if len(header["buffers"]) > MAX_BUFFERS:
        raise _bad(f"{len(header['buffers'])} buffers; at most {MAX_BUFFERS} are allowed", "header.buffers", reply_to)


def _decode_buffer(index: int, descriptor: Any, view: memoryview, seen: set[str], reply_to: str | None) -> tuple[str, BufferValue]:
    """Check one buffer descriptor against its frame and wrap the frame (zero-copy for arrays)."""
    where = f"header.buffers[{index}]"
    if not isinstance(descriptor, dict):
        raise _bad("a buffer descriptor is not a map", where, reply_to)
    name, dtype_name = descriptor.get("name"), descriptor.get("dtype")
    shape, nbytes = descriptor.get("shape"), descriptor.get("nbytes")
    if not isinstance(name, str) or not name or name in seen:
        raise _bad(f"buffer name {name!r} is missing, empty or repeated", f"{where}.name", reply_to)
    seen.add(name)
    field = f"buffers.{name}"
    if not isinstance(dtype_name, str) or dtype_name not in BUFFER_DTYPES:
        raise _bad(f"buffer dtype {dtype_name!r} is not one of {' '.join(BUFFER_DTYPES)}", field, reply_to)
    if (not isinstance(shape, list) or len(shape) > MAX_BUFFER_NDIM
            or not all(_is_int(s) and 0 <= s <= MAX_BUFFER_DIM for s in shape)):
        raise _bad(
            f"buffer shape {shape!r} is not a list of at most {MAX_BUFFER_NDIM} integers in [0, {MAX_BUFFER_DIM}]",
            field, reply_to,
        )
    if not _is_int(nbytes) or nbytes != view.nbytes:
        raise _bad(f"buffer nbytes {nbytes!r} differs from its frame's length {view.nbytes}", field, reply_to)
    dtype = BUFFER_DTYPES[dtype_name]
    if dtype is None:
        if shape != [nbytes]:
            raise _bad(f"a bytes buffer must have shape [nbytes] = [{nbytes}], got {shape}", field, reply_to)
        return name, view.tobytes()
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise _bad(f"shape {shape} of {dtype_name} needs {math.prod(shape) * dtype.itemsize} bytes, nbytes is {nbytes}", field, reply_to)
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return name, array


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame],
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Frames (without the ROUTER routing id) -> Message. Raises ProtocolError only.

    Every check above names what is wrong; a fault the checks did not foresee still becomes a
    `bad_message` error rather than escaping as another exception type.
    """
    try:
        return _decode(frames, max_message_bytes)
    except ProtocolError:
        raise
    except Exception as exc:
        raise _bad(f"the message cannot be decoded: {type(exc).__name__}: {exc}") from None


def _decode(frames: Sequence[bytes | memoryview | zmq.Frame], max_message_bytes: int) -> Message:
    # 1. Frame count, tag and sizes.
    if not isinstance(frames, Sequence) or len(frames) == 0:
        raise _bad("a message needs at least the tag, header and body frames")
    views = [_frame_view(i, frame) for i, frame in enumerate(frames)]
    if views[0] != TAG:
        shown = bytes(views[0][:16])
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"frame 0 is {shown!r}, expected {TAG!r}: the peer does not speak Dreamloom protocol 1",
        )
    if len(views) < 3:
        raise _bad(f"got {len(views)} frames; a message needs at least the tag, header and body")
    total = sum(v.nbytes for v in views)
    if total > max_message_bytes:
        raise _bad(f"the message is {total} bytes; at most {max_message_bytes} are allowed")
    if views[1].nbytes + views[2].nbytes > MAX_HEADER_BODY_BYTES:
        raise _bad(
            f"header plus body are {views[1].nbytes + views[2].nbytes} bytes; at most "
            f"{MAX_HEADER_BODY_BYTES} are allowed (large data goes in buffers)"
        )
    # 2. Header: read msg_id first so every later error can answer the request.
    header = _unpack_map(views[1], "header", None)
    msg_id = header.get("msg_id")
    reply_to = msg_id if isinstance(msg_id, str) and _MSG_ID_RE.fullmatch(msg_id) else None
    _check_header(header, reply_to)
    # 3. Body.
    body = _unpack_map(views[2], "body", reply_to)
    _check_tree(body, "", 1, reply_to)
    # 4. Buffers.
    descriptors = header["buffers"]
    if len(descriptors) != len(views) - 3:
        raise _bad(
            f"the header describes {len(descriptors)} buffers but {len(views) - 3} buffer frames arrived",
            "header.buffers",
            reply_to,
        )
    seen: set[str] = set()
    buffers = dict(
        _decode_buffer(i, d, v, seen, reply_to) for i, (d, v) in enumerate(zip(descriptors, views[3:]))
    )
    return Message(
        type=header["type"],
        body=body,
        buffers=buffers,
        job_id=header["job_id"],
        seq=header["seq"],
        reply_to=header["reply_to"],
        msg_id=msg_id,
        sent_at=float(header["sent_at"]),
    )

"""Property-based fuzzing of `decode`: whatever arrives, only ProtocolError may escape."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import MAX_STRING_CHARS, ProtocolError, decode, encode
from protocol.messages import TAG, Message

from .samples import all_dtype_buffers, assert_same_message, sample_messages

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_FRAMES = [
    [bytes(f) for f in encode(m)] for m in sample_messages(np.random.default_rng(7))
]

INTS = st.integers(-(2**63), 2**64 - 1)


def msgpack_trees(floats: st.SearchStrategy, keys: st.SearchStrategy) -> st.SearchStrategy:
    leaves = st.none() | st.booleans() | INTS | floats | st.text(max_size=20) | st.binary(max_size=20)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
        max_leaves=20,
    )


msgpack_values = msgpack_trees(st.floats(), st.text(max_size=8) | INTS)
body_values = msgpack_trees(st.floats(allow_nan=False), st.text(max_size=8))


def decode_or_protocol_error(frames: list[Any], max_message_bytes: int = 2**20 * 4) -> Message | None:
    """Decode; a ProtocolError is a fine outcome, anything else fails the test."""
    try:
        message = decode(frames, max_message_bytes)
    except ProtocolError as exc:
        assert exc.code in ("bad_message", "unsupported_protocol")
        assert exc.message
        return None
    encode(message)  # whatever decodes is a valid message again
    return message


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
def test_random_frames(frames: list[bytes], with_tag: bool) -> None:
    decode_or_protocol_error([TAG, *frames] if with_tag else frames)


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_mutated_valid_frames(frames: list[bytes], data: st.DataObject) -> None:
    """Flip, cut, insert or drop bytes and frames of real messages."""
    frames = list(frames)
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    action = data.draw(st.sampled_from(["flip", "truncate", "insert", "drop_frame", "dup_frame"]))
    if action == "flip" and frame:
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        frame = frame[: data.draw(st.integers(0, len(frame)))]
    elif action == "insert":
        position = data.draw(st.integers(0, len(frame)))
        frame[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    frames[index] = bytes(frame)
    if action == "drop_frame":
        del frames[index]
    elif action == "dup_frame":
        frames.insert(index, frames[index])
    decode_or_protocol_error(frames)


@FUZZ
@given(st.sampled_from(VALID_FRAMES), msgpack_values, st.sampled_from(["header", "body", "header_field", "descriptor"]), st.data())
def test_random_msgpack_in_valid_frames(frames: list[bytes], value: Any, where: str, data: st.DataObject) -> None:
    """Replace the header, the body, one header field or one buffer descriptor field by any msgpack value."""
    frames = list(frames)
    header = msgpack.unpackb(frames[1], raw=False)
    if where == "header":
        frames[1] = msgpack.packb(value, use_bin_type=True)
    elif where == "body":
        frames[2] = msgpack.packb(value, use_bin_type=True)
    elif where == "header_field":
        header[data.draw(st.sampled_from(sorted(header)))] = value
        frames[1] = msgpack.packb(header, use_bin_type=True)
    else:
        descriptor = data.draw(st.sampled_from(header["buffers"]))
        descriptor[data.draw(st.sampled_from(["name", "dtype", "shape", "nbytes"]))] = value
        frames[1] = msgpack.packb(header, use_bin_type=True)
    decode_or_protocol_error(frames)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=10), body_values, max_size=5),
    st.integers(0, 2**32),
)
def test_encoded_bodies_round_trip(body: dict, seed: int) -> None:
    """Any str-keyed body within the limits decodes to what was sent."""
    try:
        frames = encode(Message("event", body, all_dtype_buffers(np.random.default_rng(seed)), seq=1))
    except ValueError:
        return  # e.g. a string over the limit: the sender is told, nothing is sent
    message = decode(frames)
    assert message.body == body
    assert_same_message(decode(encode(message)), message)


NEAR_LIMIT_TEXT = st.builds(
    lambda char, size, tail: char * size + tail,
    st.sampled_from("aé中\n\x00"), st.integers(MAX_STRING_CHARS - 16, MAX_STRING_CHARS), st.text(max_size=16),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["type", "msg_id", "reply_to", "job_id"]),
    NEAR_LIMIT_TEXT,
    st.lists(st.integers(0, 2**64 - 1) | st.integers(-(2**63), -1), min_size=1, max_size=9),
    st.sampled_from(["u1", "i4", "f2", "f4", "bytes"]),
    st.binary(max_size=16),
)
def test_near_limit_strings_and_extreme_shapes(field: str, text: str, shape: list[int], dtype: str, frame: bytes) -> None:
    """Strings at the length limit in header fields, and shapes with huge, negative or zero
    entries: only a ProtocolError, and its `error` reply always encodes."""
    message = Message("ping", buffers={"b": b"\0" * len(frame)})
    frames = [bytes(f) for f in encode(message)]
    header = msgpack.unpackb(frames[1], raw=False)
    header[field] = text
    header["buffers"][0].update(dtype=dtype, shape=shape, nbytes=len(frame))
    frames[1] = msgpack.packb(header, use_bin_type=True)
    try:
        decode([*frames[:3], frame])
    except ProtocolError as exc:
        encode(exc.to_message(job_id=text if len(text) <= MAX_STRING_CHARS and text else None))

"""Frames <-> Message: round trips, zero-copy buffers, and every receive-side limit with its code."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from protocol import codec
from protocol.codec import ProtocolError, decode, encode
from protocol.messages import TAG, Message, error, new_msg_id, reply_to

from .samples import all_dtype_buffers, assert_same_message, sample_messages

VALID_ID = "0123456789abcdef0123456789abcdef"


def raw_frames(header: dict[str, Any] | None = None, body: Any = None, buffers: list[bytes] = (), drop: tuple[str, ...] = ()) -> list[bytes]:
    """Hand-packed frames: a valid `ping` header updated with `header`, minus `drop`."""
    fields = {"type": "ping", "msg_id": VALID_ID, "reply_to": None, "job_id": None, "seq": None, "sent_at": 1.0, "buffers": []}
    fields.update(header or {})
    for name in drop:
        del fields[name]
    packed_body = msgpack.packb({} if body is None else body, use_bin_type=True)
    return [TAG, msgpack.packb(fields, use_bin_type=True), packed_body, *buffers]


def decode_error(frames: list) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return info.value


def test_every_message_type_round_trips_with_every_dtype() -> None:
    messages = sample_messages(np.random.default_rng(1))
    assert len({m.type for m in messages}) == 21
    for message in messages:
        assert_same_message(decode(encode(message)), message)


def test_buffers_are_zero_copy_both_ways() -> None:
    positions_nx3 = np.arange(30, dtype=np.float32).reshape(10, 3)
    frames = encode(Message("event", buffers={"positions": positions_nx3}))
    assert np.shares_memory(np.frombuffer(frames[3], np.float32), positions_nx3)
    received = decode([bytes(f) for f in frames]).buffers["positions"]
    assert received.base is not None and not received.flags.writeable
    with pytest.raises(ValueError):
        received[0, 0] = 1.0


def test_encode_makes_buffers_little_endian_and_contiguous() -> None:
    big_endian = np.arange(12, dtype=">f4").reshape(3, 4)
    strided = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    message = decode(encode(Message("event", buffers={"big": big_endian, "strided": strided})))
    np.testing.assert_array_equal(message.buffers["big"], big_endian)
    assert message.buffers["big"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(message.buffers["strided"], strided)


def test_encode_turns_numpy_scalars_into_numbers() -> None:
    message = decode(encode(Message("progress", {"losses": {"sds": np.float32(0.5)}, "step": np.int64(3)})))
    assert message.body == {"losses": {"sds": 0.5}, "step": 3}


@pytest.mark.parametrize(
    "message, text",
    [
        (Message("nonsense"), "not a protocol 1 type"),
        (Message("event", buffers={"x": np.zeros(3, np.float64)}), "'x' has dtype float64"),
        (Message("event", buffers={"x": np.zeros(3, bool)}), "'x' has dtype bool"),
        (Message("event", buffers={"x": [1, 2]}), "'x' is a list"),
        (Message("event", buffers={f"b{i}": b"" for i in range(17)}), "17 buffers"),
        (Message("event", {"obj": object()}), "cannot encode a object"),
        (Message("event", {"huge": 2**70}), "cannot encode event"),
        (Message("event", {"s": "x" * 4097}), "4097 characters"),
        (Message("event", {1: "int key"}), "keys must be strings"),
        (Message("event", {"big": b"x" * (2**20 + 1)}), "at most 1048576"),
    ],
)
def test_encode_refuses_what_no_peer_accepts(message: Message, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        encode(message)


def test_reply_and_error_helpers() -> None:
    request = Message("cancel", {"job_id": "j"}, job_id="j")
    reply = reply_to(request, "cancelled", {"job_id": "j"})
    assert (reply.reply_to, reply.job_id, reply.type) == (request.msg_id, "j", "cancelled")
    assert reply.msg_id != request.msg_id and len(new_msg_id()) == 32
    err = error("unknown_job", "no job j", field="job_id", reply_to=request.msg_id)
    assert decode(encode(err)).body == {"code": "unknown_job", "message": "no job j", "field": "job_id"}
    with pytest.raises(ValueError, match="error code"):
        error("oops", "x")


# ---------------------------------------------------------------------------------------------
# limits, each with its error code


def test_wrong_tag_is_unsupported_protocol() -> None:
    frames = raw_frames()
    frames[0] = b"DLOOM2"
    err = decode_error(frames)
    assert err.code == "unsupported_protocol" and "DLOOM2" in err.message
    assert err.to_message().body["code"] == "unsupported_protocol"


@pytest.mark.parametrize("frames", [[], [TAG], [TAG, b"\x80"], "not frames", [TAG, 5, b"\x80"]])
def test_missing_or_foreign_frames_are_bad_message(frames: Any) -> None:
    assert decode_error(frames).code == "bad_message"


def test_whole_message_size_limit() -> None:
    frames = raw_frames({"buffers": [{"name": "b", "dtype": "bytes", "shape": [1000], "nbytes": 1000}]}, buffers=[b"x" * 1000])
    assert decode(frames, max_message_bytes=2000).buffers["b"] == b"x" * 1000
    err = decode_error_with_limit(frames, 1000)
    assert err.code == "bad_message" and "at most 1000" in err.message


def decode_error_with_limit(frames: list, limit: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, max_message_bytes=limit)
    return info.value


def test_header_plus_body_limit() -> None:
    body = {f"k{i}": "x" * 4000 for i in range(300)}  # ~1.2 MB of valid strings
    err = decode_error(raw_frames(body=body))
    assert err.code == "bad_message" and "header plus body" in err.message


def test_nesting_limit_counts_maps_and_lists() -> None:
    def nested(depth: int) -> dict:
        value: Any = 1
        for level in range(depth - 1):
            value = {"a": value} if level % 2 else [value]
        return {"top": value}

    assert decode(raw_frames(body=nested(8))).body == nested(8)
    err = decode_error(raw_frames(body=nested(9)))
    assert err.code == "bad_message" and "nested" in err.message and err.field.startswith("top")
    frames = raw_frames()
    frames[2] = b"\x81\xa1a" + b"\x91" * 5000 + b"\x01"  # {"a": [[[...1...]]]}, beyond msgpack's stack
    err = decode_error(frames)
    assert err.code == "bad_message" and err.field in ("body", "a[0][0][0][0][0][0][0]")


def test_string_limit_4096_characters() -> None:
    assert decode(raw_frames(body={"s": "\U0001f404" * 4096})).body["s"] == "\U0001f404" * 4096
    err = decode_error(raw_frames(body={"params": {"prompt": "x" * 4097}}))
    assert (err.code, err.field) == ("bad_message", "params.prompt")
    assert decode_error(raw_frames(body={"b": b"x" * 4097})).code == "bad_message"
    assert decode_error(raw_frames(body={"k" * 4097: 1})).code == "bad_message"


@pytest.mark.parametrize("key", [1, None, 1.5, b"bytes", True])
def test_map_keys_must_be_strings(key: Any) -> None:
    frames = raw_frames()
    frames[2] = msgpack.packb({"ok": {key: 1}}, use_bin_type=True)
    err = decode_error(frames)
    assert (err.code, err.field) == ("bad_message", "ok") and "keys must be strings" in err.message


def test_extension_types_are_refused() -> None:
    frames = raw_frames()
    frames[2] = msgpack.packb({"t": msgpack.ExtType(5, b"abc")}, use_bin_type=True)
    assert decode_error(frames).code == "bad_message"


def test_at_most_16_buffers() -> None:
    descriptors = [{"name": f"b{i}", "dtype": "bytes", "shape": [1], "nbytes": 1} for i in range(17)]
    err = decode_error(raw_frames({"buffers": descriptors}, buffers=[b"x"] * 17))
    assert (err.code, err.field) == ("bad_message", "header.buffers") and "16" in err.message
    assert len(decode(raw_frames({"buffers": descriptors[:16]}, buffers=[b"x"] * 16)).buffers) == 16


@pytest.mark.parametrize(
    "descriptor, frame, field, text",
    [
        ({"name": "p", "dtype": "f8", "shape": [1], "nbytes": 8}, b"x" * 8, "buffers.p", "dtype 'f8'"),
        ({"name": "p", "dtype": "f4", "shape": [3], "nbytes": 8}, b"x" * 8, "buffers.p", "needs 12 bytes"),
        ({"name": "p", "dtype": "f4", "shape": [2], "nbytes": 12}, b"x" * 8, "buffers.p", "frame's length 8"),
        ({"name": "p", "dtype": "f4", "shape": [-2], "nbytes": 8}, b"x" * 8, "buffers.p", "integers in [0, "),
        ({"name": "p", "dtype": "f4", "shape": [True, 2], "nbytes": 8}, b"x" * 8, "buffers.p", "integers in [0, "),
        ({"name": "p", "dtype": "u1", "shape": [1] * 9, "nbytes": 1}, b"x", "buffers.p", "at most 8"),
        ({"name": "p", "dtype": "bytes", "shape": [2, 4], "nbytes": 8}, b"x" * 8, "buffers.p", "shape [nbytes]"),
        ({"name": "", "dtype": "bytes", "shape": [1], "nbytes": 1}, b"x", "header.buffers[0].name", "name"),
        ({"dtype": "bytes", "shape": [1], "nbytes": 1}, b"x", "header.buffers[0].name", "name"),
        ("not a map", b"x", "header.buffers[0]", "not a map"),
    ],
)
def test_buffer_descriptor_must_match_its_frame(descriptor: Any, frame: bytes, field: str, text: str) -> None:
    err = decode_error(raw_frames({"buffers": [descriptor]}, buffers=[frame]))
    assert (err.code, err.field) == ("bad_message", field)
    assert text in err.message and err.reply_to == VALID_ID


def test_buffer_names_are_unique_and_counts_match() -> None:
    one = {"name": "a", "dtype": "bytes", "shape": [1], "nbytes": 1}
    assert "repeated" in decode_error(raw_frames({"buffers": [one, one]}, buffers=[b"x", b"x"])).message
    assert "1 buffers but 2" in decode_error(raw_frames({"buffers": [one]}, buffers=[b"x", b"y"])).message
    assert "1 buffers but 0" in decode_error(raw_frames({"buffers": [one]})).message


@pytest.mark.parametrize("name", ["type", "msg_id", "reply_to", "job_id", "seq", "sent_at", "buffers"])
def test_every_header_field_must_be_present(name: str) -> None:
    err = decode_error(raw_frames(drop=(name,)))
    assert (err.code, err.field) == ("bad_message", f"header.{name}")


@pytest.mark.parametrize(
    "name, value",
    [
        ("type", "teleport"), ("type", 3),
        ("msg_id", VALID_ID.upper()), ("msg_id", VALID_ID[:-1]), ("msg_id", None), ("msg_id", b"0" * 32),
        ("reply_to", "nope"), ("reply_to", 7),
        ("job_id", ""), ("job_id", 12),
        ("seq", 0), ("seq", True), ("seq", 1.5), ("seq", "1"),
        ("sent_at", float("nan")), ("sent_at", float("inf")), ("sent_at", "now"), ("sent_at", False),
        ("buffers", {}), ("buffers", None),
    ],
)
def test_header_fields_are_typed(name: str, value: Any) -> None:
    err = decode_error(raw_frames({name: value}))
    assert (err.code, err.field) == ("bad_message", f"header.{name}")
    assert err.reply_to == (None if name == "msg_id" else VALID_ID)


def test_header_and_body_must_be_msgpack_maps() -> None:
    frames = raw_frames()
    assert decode_error([TAG, b"\xc1", frames[2]]).field == "header"
    assert decode_error([TAG, msgpack.packb([1, 2]), frames[2]]).field == "header"
    err = decode_error([TAG, frames[1], b"\x92\x01"])  # truncated array
    assert (err.field, err.reply_to) == ("body", VALID_ID)
    assert decode_error([TAG, frames[1], frames[2] + b"\x00"]).field == "body"  # trailing data
    assert decode_error([TAG, frames[1], msgpack.packb("a string")]).field == "body"


def test_unknown_fields_are_ignored() -> None:
    message = decode(raw_frames({"later_field": {"x": 1}}, body={"new": [1, 2]}))
    assert message.type == "ping" and message.body == {"new": [1, 2]}


def test_error_reply_answers_the_bad_request() -> None:
    err = decode_error(raw_frames({"seq": -1}))
    reply = decode(encode(err.to_message(job_id="j")))
    assert (reply.type, reply.reply_to, reply.job_id) == ("error", VALID_ID, "j")
    assert reply.body == {"code": "bad_message", "message": err.message, "field": "header.seq"}


def test_limits_are_the_documented_numbers() -> None:
    assert (codec.MAX_HEADER_BODY_BYTES, codec.MAX_NESTING, codec.MAX_STRING_CHARS, codec.MAX_BUFFERS) == (
        2**20, 8, 4096, 16
    )


def test_accepts_bytearray_and_memoryview_frames() -> None:
    message = Message("event", buffers=all_dtype_buffers(np.random.default_rng(3)))
    frames = [bytearray(bytes(f)) if i % 2 else memoryview(bytes(f)) for i, f in enumerate(encode(message))]
    assert_same_message(decode(frames), message)

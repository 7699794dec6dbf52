"""Shared helpers of the protocol tests: real images, sample messages, comparison."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.messages import ALL_TYPES, REPLY_TYPES, Message, new_msg_id
from protocol.messages import MessageType as T

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MESHES = SHARED / "meshes"


def png_bytes(width: int, height: int, mode: str = "RGBA") -> bytes:
    image = Image.new(mode, (width, height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(width: int, height: int, **options) -> bytes:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(gradient, "RGB").save(out, format="JPEG", **options)
    return out.getvalue()


def all_dtype_buffers(rng: np.random.Generator) -> dict[str, np.ndarray | bytes]:
    """One buffer of every protocol dtype, including empty and 0-d shapes."""
    return {
        "colors": rng.integers(0, 256, size=(5, 3), dtype=np.uint8),
        "faces": rng.integers(-5, 5, size=(4, 3), dtype=np.int32),
        "ids": rng.integers(0, 2**32, size=(7,), dtype=np.uint32),
        "half": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "positions": rng.standard_normal((6, 3)).astype(np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
        "file": b"\x89PNG\r\n\x1a\n some encoded file",
        "nothing": b"",
    }


def assert_same_message(got: Message, want: Message) -> None:
    assert (got.type, got.body, got.job_id, got.seq, got.reply_to, got.msg_id) == (
        want.type, want.body, want.job_id, want.seq, want.reply_to, want.msg_id
    )
    assert got.sent_at == pytest.approx(want.sent_at)
    assert list(got.buffers) == list(want.buffers)
    for name, value in want.buffers.items():
        received = got.buffers[name]
        if isinstance(value, np.ndarray):
            assert isinstance(received, np.ndarray), name
            assert received.dtype == value.dtype and received.shape == value.shape, name
            np.testing.assert_array_equal(received, value)
        else:
            assert bytes(received) == bytes(value), name


def sample_messages(rng: np.random.Generator) -> list[Message]:
    """One realistic message of every protocol type, each also carrying buffers of every dtype."""
    job_id = "0123456789abcdef0123456789abcdef"
    request_id = new_msg_id()
    bodies: dict[str, dict] = {
        T.HELLO: {"client_name": "blender", "client_version": "0.1.0", "protocol": 1},
        T.WELCOME: {
            "server_version": "0.1.0", "protocol": 1, "device": "cpu",
            "models": {"prior": "tiny-sd", "zero123": "tiny-zero123"},
            "max_message_bytes": 512 * 2**20, "heartbeat_ms": 2000,
        },
        T.SUBMIT: {"kind": "generate", "params": {"prompt": "a ceramic cow", "camera": {"reference": {"elevation_deg": 5.0}}}},
        T.ACCEPTED: {"job_id": job_id, "position": 0},
        T.CANCEL: {"job_id": job_id},
        T.CANCELLED: {"job_id": job_id},
        T.SUBSCRIBE: {"job_id": job_id, "after_seq": 3},
        T.SUBSCRIBED: {"job_id": job_id, "last_seq": 7},
        T.UNSUBSCRIBE: {"job_id": job_id},
        T.UNSUBSCRIBED: {"job_id": job_id},
        T.LIST_JOBS: {},
        T.JOBS: {"jobs": [{
            "job_id": job_id, "kind": "generate", "state": "running", "stage": "coarse", "step": 10,
            "steps": 500, "created_at": 1.7e9, "prompt": "a ceramic cow \u00e9\u00e8 \U0001f404", "last_seq": 4,
        }]},
        T.GET_RESULT: {"job_id": job_id},
        T.RESULT: {"job_id": job_id, "format": "glb"},
        T.DELETE_JOB: {"job_id": job_id},
        T.DELETED: {"job_id": job_id},
        T.PING: {},
        T.PONG: {},
        T.ERROR: {"code": "bad_params", "message": "params.prompt must not be empty", "field": "params.prompt"},
        T.EVENT: {
            "event": "mesh", "stage": "geometry", "step": 250, "final": False, "vertex_count": 6,
            "face_count": 4, "bbox": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
        },
        T.PROGRESS: {"stage": "texture", "step": 3, "steps": 10, "eta_s": None, "losses": {"sds": 0.25, "nan": float("inf")}},
    }
    messages = []
    for type_name in sorted(ALL_TYPES):
        is_reply = type_name in REPLY_TYPES
        messages.append(Message(
            type=type_name,
            body=bodies[type_name],
            buffers=all_dtype_buffers(rng),
            job_id=job_id if type_name in (T.EVENT, T.PROGRESS, T.ACCEPTED) else None,
            seq=5 if type_name == T.EVENT else None,
            reply_to=request_id if is_reply else None,
        ))
    return messages

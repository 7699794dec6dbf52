"""Section 6 validation: defaults, every rule with its field path, image headers, mesh buffers."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol.codec import ProtocolError, decode, encode
from protocol.messages import Message
from protocol.params import (
    DISTILL_METHODS,
    CameraParams,
    GenerateParams,
    RefineParams,
    ReferenceView,
    StepOverrides,
    image_info,
    params_to_dict,
    validate_submit,
)

from .samples import jpeg_bytes, png_bytes


def refused(kind: Any, params: Any, buffers: dict | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        validate_submit(kind, params, buffers or {})
    assert info.value.code == "bad_params"
    return info.value


@pytest.fixture()
def refine_buffers(spot_mesh) -> dict[str, Any]:
    positions_nx3, faces_mx3, _ = spot_mesh
    return {"positions": positions_nx3, "faces": faces_mx3}


def test_defaults_are_filled() -> None:
    params = validate_submit("generate", {"prompt": "a ceramic cow"}, {})
    assert params == GenerateParams(prompt="a ceramic cow")
    assert params.camera == CameraParams(
        reference=ReferenceView(0.0, 0.0, 3.8, 20.0),
        elevation_deg=(-10.0, 45.0), azimuth_deg=(-180.0, 180.0), distance=(3.8, 3.8), fov_deg=(20.0, 20.0),
    )
    assert (params.quality, params.seed, params.texture_size, params.mesh_every, params.preview_every) == (
        "standard", 0, 1024, 250, 25
    )
    assert params.steps == StepOverrides(None, None, None) and params.negative_prompt == ""
    assert params.distill == "sds"


def test_full_generate_params_with_image() -> None:
    raw = {
        "prompt": "a cow", "negative_prompt": "blurry",
        "camera": {
            "reference": {"elevation_deg": 10, "azimuth_deg": -30.5, "distance": 2.0, "fov_deg": 40},
            "elevation_deg": [-89, 89], "azimuth_deg": [-180, 180], "distance": [1, 100], "fov_deg": [1, 120],
        },
        "quality": "high", "steps": {"coarse": 0, "geometry": 100_000, "texture": 5}, "seed": 2**31 - 1,
        "texture_size": 4096, "mesh_every": 10, "preview_every": 1, "future_field": "ignored",
    }
    params = validate_submit("generate", raw, {"image": png_bytes(64, 48)})
    assert params.camera.reference == ReferenceView(10.0, -30.5, 2.0, 40.0)
    assert params.camera.distance == (1.0, 100.0) and params.steps == StepOverrides(0, 100_000, 5)
    assert (params.seed, params.texture_size, params.mesh_every, params.preview_every) == (2**31 - 1, 4096, 10, 1)


def test_refine_params_with_real_mesh_and_texture(spot_mesh, refine_buffers) -> None:
    positions_nx3, _, texture_png = spot_mesh
    uvs_nx2 = np.zeros((len(positions_nx3), 2), np.float32)
    buffers = {**refine_buffers, "uvs": uvs_nx2, "texture": texture_png, "image": jpeg_bytes(32, 32)}
    params = validate_submit("refine_texture", {"prompt": "a cow", "steps": {"texture": 7}}, buffers)
    assert isinstance(params, RefineParams) and params.steps == StepOverrides(texture=7)


def test_refine_buffers_survive_the_wire(refine_buffers) -> None:
    """What a client encodes, the server validates after decoding (read-only, zero-copy arrays)."""
    message = Message("submit", {"kind": "refine_texture", "params": {"prompt": "cow"}}, refine_buffers)
    received = decode(encode(message))
    params = validate_submit(received.body["kind"], received.body["params"], received.buffers)
    assert params.prompt == "cow"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"prompt": ""}, "params.prompt"),
        ({"prompt": "   "}, "params.prompt"),
        ({"prompt": "x" * 1001}, "params.prompt"),
        ({"prompt": 5}, "params.prompt"),
        ({"prompt": None}, "params.prompt"),
        ({"negative_prompt": "x" * 1001}, "params.negative_prompt"),
        ({"negative_prompt": b"bytes"}, "params.negative_prompt"),
        ({"camera": []}, "params.camera"),
        ({"camera": {"reference": 3}}, "params.camera.reference"),
        ({"camera": {"reference": {"elevation_deg": 90}}}, "params.camera.reference.elevation_deg"),
        ({"camera": {"reference": {"azimuth_deg": -181}}}, "params.camera.reference.azimuth_deg"),
        ({"camera": {"reference": {"distance": 0}}}, "params.camera.reference.distance"),
        ({"camera": {"reference": {"distance": float("inf")}}}, "params.camera.reference.distance"),
        ({"camera": {"reference": {"fov_deg": float("nan")}}}, "params.camera.reference.fov_deg"),
        ({"camera": {"reference": {"fov_deg": True}}}, "params.camera.reference.fov_deg"),
        ({"camera": {"elevation_deg": [-90, 10]}}, "params.camera.elevation_deg"),
        ({"camera": {"elevation_deg": [40, 10]}}, "params.camera.elevation_deg"),
        ({"camera": {"elevation_deg": [10]}}, "params.camera.elevation_deg"),
        ({"camera": {"elevation_deg": "10,20"}}, "params.camera.elevation_deg"),
        ({"camera": {"azimuth_deg": [-180, 181]}}, "params.camera.azimuth_deg"),
        ({"camera": {"distance": [0, 3]}}, "params.camera.distance"),
        ({"camera": {"distance": [1, 101]}}, "params.camera.distance"),
        ({"camera": {"distance": [3, float("nan")]}}, "params.camera.distance"),
        ({"camera": {"fov_deg": [0.5, 20]}}, "params.camera.fov_deg"),
        ({"camera": {"fov_deg": [20, 121]}}, "params.camera.fov_deg"),
        ({"camera": {"fov_deg": [False, 20]}}, "params.camera.fov_deg"),
        ({"quality": "ultra"}, "params.quality"),
        ({"quality": None}, "params.quality"),
        ({"distill": "dds"}, "params.distill"),
        ({"distill": "SDS"}, "params.distill"),
        ({"distill": None}, "params.distill"),
        ({"steps": []}, "params.steps"),
        ({"steps": {"coarse": -1}}, "params.steps.coarse"),
        ({"steps": {"geometry": 100_001}}, "params.steps.geometry"),
        ({"steps": {"texture": 1.0}}, "params.steps.texture"),
        ({"steps": {"texture": True}}, "params.steps.texture"),
        ({"steps": {"refine": 10}}, "params.steps.refine"),
        ({"seed": -1}, "params.seed"),
        ({"seed": 2**31}, "params.seed"),
        ({"seed": True}, "params.seed"),
        ({"seed": 1.0}, "params.seed"),
        ({"texture_size": 1000}, "params.texture_size"),
        ({"texture_size": 1024.0}, "params.texture_size"),
        ({"texture_size": 8192}, "params.texture_size"),
        ({"mesh_every": 9}, "params.mesh_every"),
        ({"mesh_every": "250"}, "params.mesh_every"),
        ({"preview_every": 0}, "params.preview_every"),
        ({"preview_every": False}, "params.preview_every"),
    ],
)
def test_each_rule_names_its_field(patch: dict, field: str) -> None:
    err = refused("generate", {"prompt": "a cow", **patch})
    assert err.field == field and field in err.message


def test_kind_params_and_required_prompt() -> None:
    assert refused("sculpt", {"prompt": "x"}).field == "kind"
    assert refused(None, {"prompt": "x"}).field == "kind"
    assert refused(["generate"], {"prompt": "x"}).field == "kind"
    assert refused("generate", ["prompt"]).field == "params"
    assert refused("generate", None).field == "params"
    err = refused("generate", {})
    assert err.field == "params.prompt" and "required" in err.message


def test_refine_allows_only_texture_steps(refine_buffers) -> None:
    for stage in ("coarse", "geometry"):
        err = refused("refine_texture", {"prompt": "a cow", "steps": {stage: 1}}, refine_buffers)
        assert err.field == f"params.steps.{stage}"


def test_image_buffer_rules() -> None:
    ok = {"prompt": "a cow"}
    assert refused("generate", ok, {"image": np.zeros(10, np.uint8)}).field == "buffers.image"
    assert "neither a PNG nor a JPEG" in refused("generate", ok, {"image": b"GIF89a......"}).message
    assert "4097x16" in refused("generate", ok, {"image": png_bytes(4097, 16, "L")}).message
    assert "16x4097" in refused("generate", ok, {"image": jpeg_bytes(16, 4097)}).message
    oversized = png_bytes(8, 8) + b"\0" * (32 * 2**20)
    assert "at most 33554432" in refused("generate", ok, {"image": oversized}).message
    validate_submit("generate", ok, {"image": png_bytes(4096, 1, "L")})


def test_prompt_is_optional_with_an_image(refine_buffers) -> None:
    image = {"image": png_bytes(8, 8)}
    assert validate_submit("generate", {}, image).prompt == ""
    assert validate_submit("generate", {"prompt": "  "}, image).prompt == "  "
    assert validate_submit("refine_texture", {"prompt": ""}, {**refine_buffers, **image}).prompt == ""
    assert refused("generate", {"prompt": 5}, image).field == "params.prompt"
    err = refused("refine_texture", {"prompt": ""}, refine_buffers)
    assert err.field == "params.prompt" and "buffers.image" in err.message


@pytest.mark.parametrize(
    "change, field, text",
    [
        (lambda b: b.pop("positions"), "buffers.positions", "needs the buffer"),
        (lambda b: b.pop("faces"), "buffers.faces", "needs the buffer"),
        (lambda b: b.update(positions=b["positions"].astype(np.float64)), "buffers.positions", "f4"),
        (lambda b: b.update(positions=b["positions"][:, :2].copy()), "buffers.positions", "[N, 3]"),
        (lambda b: b.update(positions=b["positions"][:0]), "buffers.positions", "empty"),
        (lambda b: b.update(positions=np.where(np.arange(3) == 1, np.nan, b["positions"]).astype(np.float32)), "buffers.positions", "NaN"),
        (lambda b: b.update(faces=b["faces"].astype(np.int64)), "buffers.faces", "i4"),
        (lambda b: b.update(faces=b["faces"].astype(np.uint32)), "buffers.faces", "i4"),
        (lambda b: b.update(faces=b["faces"].astype(">i4")), "buffers.faces", "got >i4"),
        (lambda b: b.update(faces=b["faces"].reshape(-1)), "buffers.faces", "[N, 3]"),
        (lambda b: b.update(faces=np.where(b["faces"] == 0, len(b["positions"]), b["faces"]).astype(np.int32)), "buffers.faces", "[0, "),
        (lambda b: b.update(faces=np.where(b["faces"] == 0, -1, b["faces"]).astype(np.int32)), "buffers.faces", "index -1"),
        (lambda b: b.update(faces=b"not an array"), "buffers.faces", "i4 array"),
        (lambda b: b.update(uvs=np.zeros((len(b["positions"]) - 1, 2), np.float32)), "buffers.uvs", "shape"),
        (lambda b: b.update(uvs=np.full((len(b["positions"]), 2), np.inf, np.float32)), "buffers.uvs", "infinite"),
        (lambda b: b.update(texture=jpeg_bytes(8, 8)), "buffers.texture", "must be a PNG"),
        (lambda b: b.update(texture=b"\x89PNG\r\n\x1a\n"), "buffers.texture", "IHDR"),
        (lambda b: b.update(image=b"\xff\xd8\xff\xe0\x00"), "buffers.image", "JPEG"),
    ],
)
def test_refine_buffer_rules(refine_buffers, change, field: str, text: str) -> None:
    buffers = dict(refine_buffers)
    change(buffers)
    err = refused("refine_texture", {"prompt": "a cow"}, buffers)
    assert err.field == field and text in err.message


def test_unknown_distill_method_lists_the_valid_ones() -> None:
    err = refused("generate", {"prompt": "a cow", "distill": "dds"}, {})
    assert err.field == "params.distill"
    assert err.message == "params.distill must be one of sds, nfsd, ism, sjc, vsd, got 'dds'"


def test_faces_index_bound_is_exclusive() -> None:
    positions_nx3 = np.zeros((3, 3), np.float32)
    validate_submit("refine_texture", {"prompt": "x"}, {"positions": positions_nx3, "faces": np.array([[0, 1, 2]], np.int32)})
    err = refused("refine_texture", {"prompt": "x"}, {"positions": positions_nx3, "faces": np.array([[0, 1, 3]], np.int32)})
    assert "index 3" in err.message and "[0, 3)" in err.message


ranges = st.tuples(st.floats(-89, 89), st.floats(-89, 89)).map(sorted)


@settings(max_examples=150, deadline=None)
@given(
    st.builds(
        GenerateParams,
        prompt=st.text(min_size=1, max_size=40).filter(str.strip),
        negative_prompt=st.text(max_size=40),
        camera=st.builds(
            CameraParams,
            reference=st.builds(ReferenceView, st.floats(-89, 89), st.floats(-180, 180), st.floats(0.01, 100), st.floats(1, 120)),
            elevation_deg=ranges.map(tuple),
            azimuth_deg=st.tuples(st.floats(-180, 180), st.floats(-180, 180)).map(sorted).map(tuple),
            distance=st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)).map(sorted).map(tuple),
            fov_deg=st.tuples(st.floats(1, 120), st.floats(1, 120)).map(sorted).map(tuple),
        ),
        quality=st.sampled_from(["draft", "standard", "high"]),
        distill=st.sampled_from(DISTILL_METHODS),
        steps=st.builds(StepOverrides, *[st.none() | st.integers(0, 100_000)] * 3),
        seed=st.integers(0, 2**31 - 1),
        texture_size=st.sampled_from([256, 512, 1024, 2048, 4096]),
        mesh_every=st.integers(10, 10**6),
        preview_every=st.integers(1, 10**6),
    )
)
def test_params_to_dict_round_trips_through_the_wire(params: GenerateParams) -> None:
    raw = decode(encode(Message("submit", {"kind": "generate", "params": params_to_dict(params)}))).body["params"]
    assert validate_submit("generate", raw, {}) == params


def test_refine_params_to_dict_round_trip(refine_buffers) -> None:
    params = RefineParams(prompt="cow", steps=StepOverrides(texture=3), seed=9)
    assert validate_submit("refine_texture", params_to_dict(params), refine_buffers) == params


# ---------------------------------------------------------------------------------------------
# image_info on real files


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA", "P", "I;16"])
def test_image_info_png(mode: str) -> None:
    assert image_info(png_bytes(37, 21, mode)) == ("png", 37, 21)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"quality": 20, "subsampling": 2}, {"exif": b"Exif\0\0" + b"\0" * 30000}])
def test_image_info_jpeg(options: dict) -> None:
    assert image_info(jpeg_bytes(50, 33, **options)) == ("jpeg", 50, 33)


def test_image_info_on_the_real_spot_texture(spot_mesh) -> None:
    kind, width, height = image_info(spot_mesh[2])
    assert kind == "png" and width > 0 and height > 0
    assert Image.open(io.BytesIO(spot_mesh[2])).size == (width, height)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDX", png_bytes(5, 5)[:20], b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\0" * 12,
     b"\xff\xd8\xffX\x00\x00", b"\xff\xd8\xff\xe0\x00\x01", jpeg_bytes(8, 8)[:30], b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\0\0\0\0\5"],
)
def test_image_info_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        image_info(data, field="buffers.texture")
    assert (info.value.code, info.value.field) == ("bad_params", "buffers.texture")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b""]), st.binary(max_size=80))
def test_image_info_never_raises_anything_else(prefix: bytes, rest: bytes) -> None:
    try:
        kind, width, height = image_info(prefix + rest)
    except ProtocolError:
        return
    assert kind in ("png", "jpeg") and width >= 1 and height >= 1

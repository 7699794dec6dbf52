"""Job parameters of a `submit` (PROTOCOL.md section 6): validation into typed, frozen dataclasses.

`validate_submit` checks the `kind`, every field of `params` and the buffers the kind needs, fills
defaults, and raises `ProtocolError("bad_params", ..., field=...)` naming the first bad field as a
dotted path (`params.camera.elevation_deg`, `buffers.faces`). Unknown fields are ignored, as
everywhere in the protocol, except inside `params.steps`, where a misspelt stage would silently do
nothing and is refused instead, and among the buffers, which the server would otherwise store.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codec import ProtocolError
from .messages import JOB_KINDS, ErrorCode, JobKind

MAX_PROMPT_CHARS = 1000
"""`prompt` and `negative_prompt`, in characters."""
QUALITIES = ("draft", "standard", "high")
DISTILL_METHODS = ("sds", "nfsd", "ism", "sjc", "vsd")
"""Score-distillation methods of the 2D prior (docs/guidance.md); sds is DreamCraft3D's."""
TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
MAX_STEPS = 100_000
MAX_SEED = 2**31 - 1
MAX_TARGET_FACES = 2**31 - 1
"""`target_faces` fits an i4; budgets under 500 or above the surface's own count are clamped by
the backend (with a `note` event), not refused."""
MIN_MESH_EVERY = 10
MIN_PREVIEW_EVERY = 1
KIND_BUFFERS = {
    JobKind.GENERATE: ("image",),
    JobKind.REFINE_TEXTURE: ("positions", "faces", "uvs", "texture", "image"),
}
"""The buffers a `submit` of each kind may carry; any other is refused."""
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A `submit`'s optional `request_id`: 1 to 64 letters, digits and `._:-`."""
MAX_IMAGE_SIDE = 4096
"""Reference image and texture: pixels per side."""
MAX_IMAGE_BYTES = 32 * 2**20
"""Reference image and texture: encoded size."""

ELEVATION_BOUNDS = (-89.0, 89.0)
AZIMUTH_BOUNDS = (-180.0, 180.0)
DISTANCE_BOUNDS = (0.0, 100.0)  # min is exclusive
FOV_BOUNDS = (1.0, 120.0)


@dataclass(frozen=True)
class ReferenceView:
    """The camera the reference image was taken from (same bounds as the sampling ranges)."""

    elevation_deg: float = 0.0
    """Degrees above the XY plane, in [-89, 89]."""
    azimuth_deg: float = 0.0
    """Degrees around Z; 0 is Blender's front view (camera on -Y), in [-180, 180]."""
    distance: float = 3.8
    """Metres from the origin, in (0, 100]."""
    fov_deg: float = 20.0
    """Vertical field of view in degrees, in [1, 120]."""


@dataclass(frozen=True)
class CameraParams:
    """The reference view and the ranges training cameras are sampled from."""

    reference: ReferenceView = field(default_factory=ReferenceView)
    """Where the reference image was taken from."""
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    """(min, max) elevation of sampled cameras; -89 <= min <= max <= 89."""
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    """(min, max) azimuth of sampled cameras; -180 <= min <= max <= 180."""
    distance: tuple[float, float] = (3.8, 3.8)
    """(min, max) camera distance; 0 < min <= max <= 100."""
    fov_deg: tuple[float, float] = (20.0, 20.0)
    """(min, max) vertical field of view; 1 <= min <= max <= 120."""


@dataclass(frozen=True)
class StepOverrides:
    """Per-stage step counts replacing the quality preset's; None keeps the preset, 0 skips."""

    coarse: int | None = None
    """NeuS stage steps, 0 to 100,000."""
    geometry: int | None = None
    """DMTet geometry stage steps, 0 to 100,000."""
    texture: int | None = None
    """Texture (BSD) stage steps, 0 to 100,000."""


@dataclass(frozen=True)
class JobParams:
    """The validated parameters both job kinds share (PROTOCOL.md section 6)."""

    prompt: str
    """What to make (or what the texture should show), 1 to 1,000 characters."""
    negative_prompt: str = ""
    """What to avoid, up to 1,000 characters."""
    camera: CameraParams = field(default_factory=CameraParams)
    """Reference view and sampling ranges."""
    quality: str = "standard"
    """Preset: draft, standard or high."""
    distill: str = "sds"
    """The 2D prior's score distillation in the coarse and geometry stages: sds, nfsd, ism,
    sjc or vsd."""
    steps: StepOverrides = field(default_factory=StepOverrides)
    """Per-stage step overrides (a refine job may set only `texture`)."""
    seed: int = 0
    """Random seed, 0 to 2**31 - 1."""
    texture_size: int = 1024
    """Texture side in pixels: 256, 512, 1024, 2048 or 4096."""
    mesh_every: int = 250
    """Stream a `mesh` event every this many steps (>= 10)."""
    preview_every: int = 25
    """Attach a preview PNG to `progress` every this many steps (>= 1)."""


@dataclass(frozen=True)
class GenerateParams(JobParams):
    """A validated `generate` job: prompt (and optional reference image) to a textured mesh."""

    target_faces: int | None = None
    """Face budget of the result, 0 to 2**31 - 1: the surface is decimated to it before UV
    unwrapping; 0 keeps every face, None the quality's default (50,000; 150,000 for high)."""


@dataclass(frozen=True)
class RefineParams(JobParams):
    """A validated `refine_texture` job: keep the sent geometry, make UVs and a texture."""

# ---------------------------------------------------------------------------------------------
# field checks


def _fail(field_path: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PARAMS, message, field_path)


def _number(value: Any, path: str) -> float:
    """A finite int or float (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"{path} must be a number, got {value!r}")
    number = float(value) if abs(value) < 1e308 else math.inf
    if not math.isfinite(number):
        raise _fail(path, f"{path} must be finite, got {value!r}")
    return number


def _integer(value: Any, path: str, low: int, high: int | None = None) -> int:
    """An int (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{path} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise _fail(path, f"{path} must be at least {low}{upper}, got {value}")
    return value


def _text(value: Any, path: str, min_chars: int) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"{path} must be a string, got {value!r}")
    if len(value) > MAX_PROMPT_CHARS:
        raise _fail(path, f"{path} has {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if len(value.strip()) < min_chars:
        raise _fail(path, f"{path} must not be empty")
    return value


def _bounded(value: Any, path: str, bounds: tuple[float, float], low_open: bool = False) -> float:
    number = _number(value, path)
    low, high = bounds
    if number < low or number > high or (low_open and number == low):
        low_text = f"> {low:g}" if low_open else f">= {low:g}"
        raise _fail(path, f"{path} must be {low_text} and <= {high:g}, got {value!r}")
    return number


def _range(value: Any, path: str, bounds: tuple[float, float], low_open: bool = False) -> tuple[float, float]:
    """A [min, max] pair inside bounds with min <= max."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(path, f"{path} must be a [min, max] list of two numbers, got {value!r}")
    low = _bounded(value[0], path, bounds, low_open)
    high = _bounded(value[1], path, bounds, low_open)
    if low > high:
        raise _fail(path, f"{path} has min {low:g} greater than max {high:g}")
    return (low, high)


def _map(value: Any, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(path, f"{path} must be a map, got {type(value).__name__}")
    return value


def _reference(value: Any, path: str) -> ReferenceView:
    raw = _map(value, path)
    default = ReferenceView()
    return ReferenceView(
        elevation_deg=_bounded(raw.get("elevation_deg", default.elevation_deg), f"{path}.elevation_deg", ELEVATION_BOUNDS),
        azimuth_deg=_bounded(raw.get("azimuth_deg", default.azimuth_deg), f"{path}.azimuth_deg", AZIMUTH_BOUNDS),
        distance=_bounded(raw.get("distance", default.distance), f"{path}.distance", DISTANCE_BOUNDS, low_open=True),
        fov_deg=_bounded(raw.get("fov_deg", default.fov_deg), f"{path}.fov_deg", FOV_BOUNDS),
    )


def _camera(value: Any, path: str) -> CameraParams:
    raw = _map(value, path)
    default = CameraParams()
    return CameraParams(
        reference=_reference(raw.get("reference", {}), f"{path}.reference"),
        elevation_deg=_range(raw.get("elevation_deg", default.elevation_deg), f"{path}.elevation_deg", ELEVATION_BOUNDS),
        azimuth_deg=_range(raw.get("azimuth_deg", default.azimuth_deg), f"{path}.azimuth_deg", AZIMUTH_BOUNDS),
        distance=_range(raw.get("distance", default.distance), f"{path}.distance", DISTANCE_BOUNDS, low_open=True),
        fov_deg=_range(raw.get("fov_deg", default.fov_deg), f"{path}.fov_deg", FOV_BOUNDS),
    )


def _steps(value: Any, path: str, allowed: tuple[str, ...]) -> StepOverrides:
    raw = _map(value, path)
    for key in raw:
        if key not in allowed:
            raise _fail(f"{path}.{key}", f"{path}.{key} is not a stage this kind can override; allowed: {', '.join(allowed)}")
    counts = {
        key: None if raw.get(key) is None else _integer(raw[key], f"{path}.{key}", 0, MAX_STEPS)
        for key in allowed
    }
    return StepOverrides(**counts)


def _common_fields(raw: Mapping, steps_allowed: tuple[str, ...], has_image: bool) -> dict[str, Any]:
    """Every params field, validated, defaults filled; keyword arguments for either dataclass.

    The prompt may be empty (or left out) only when a reference image is sent.
    """
    if not has_image and not str(raw.get("prompt") or "").strip():
        raise _fail("params.prompt", "params.prompt is required and must not be empty when no buffers.image is sent")
    quality = raw.get("quality", "standard")
    if quality not in QUALITIES:
        raise _fail("params.quality", f"params.quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    distill = raw.get("distill", "sds")
    if distill not in DISTILL_METHODS:
        raise _fail("params.distill", f"params.distill must be one of {', '.join(DISTILL_METHODS)}, got {distill!r}")
    texture_size = _integer(raw.get("texture_size", 1024), "params.texture_size", TEXTURE_SIZES[0], TEXTURE_SIZES[-1])
    if texture_size not in TEXTURE_SIZES:
        raise _fail(
            "params.texture_size",
            f"params.texture_size must be one of {', '.join(map(str, TEXTURE_SIZES))}, got {texture_size!r}",
        )
    return dict(
        prompt=_text(raw.get("prompt", ""), "params.prompt", 0),
        negative_prompt=_text(raw.get("negative_prompt", ""), "params.negative_prompt", 0),
        camera=_camera(raw.get("camera", {}), "params.camera"),
        quality=quality,
        distill=distill,
        steps=_steps(raw.get("steps", {}), "params.steps", steps_allowed),
        seed=_integer(raw.get("seed", 0), "params.seed", 0, MAX_SEED),
        texture_size=texture_size,
        mesh_every=_integer(raw.get("mesh_every", 250), "params.mesh_every", MIN_MESH_EVERY),
        preview_every=_integer(raw.get("preview_every", 25), "params.preview_every", MIN_PREVIEW_EVERY),
    )


# ---------------------------------------------------------------------------------------------
# images


def _png_size(data: bytes) -> tuple[int, int]:
    # Signature, then chunks (length, type, data, CRC) up to IEND. The first is IHDR (width,
    # height: big-endian u32); a second IHDR anywhere would let a decoder use another size.
    size = None
    pos = 8
    while pos + 8 <= len(data):
        length, chunk_type = struct.unpack(">I4s", data[pos: pos + 8])
        if chunk_type == b"IHDR":
            if size is not None:
                raise ValueError(f"the PNG has a second IHDR chunk at byte {pos}")
            if length != 13 or pos + 16 > len(data):
                raise ValueError(f"the PNG's IHDR chunk is {length} bytes, not 13")
            size = struct.unpack(">II", data[pos + 8: pos + 16])
        elif size is None:
            raise ValueError("the PNG does not start with an IHDR chunk")
        if chunk_type == b"IEND":
            break
        pos += 12 + length
    if size is None:
        raise ValueError("the PNG has no IHDR chunk")
    return size


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk the marker segments after SOI until a start-of-frame segment gives the size.
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"the JPEG has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the frame header comes before
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise ValueError(f"the JPEG has a segment of length {length}")
        if marker in _JPEG_SOF:
            if size is not None:
                raise ValueError(f"the JPEG has a second frame header at byte {pos}")
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (width, height)
        pos += 2 + length
    if size is None:
        raise ValueError("the JPEG has no frame header")
    return size


def image_info(data: bytes | bytearray | memoryview, field: str = "buffers.image") -> tuple[str, int, int]:
    """("png" | "jpeg", width, height) read from the file's header; ProtocolError on anything else."""
    head = data if isinstance(data, bytes) else bytes(data)
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            kind, (width, height) = "png", _png_size(head)
        elif head.startswith(b"\xff\xd8\xff"):
            kind, (width, height) = "jpeg", _jpeg_size(head)
        else:
            raise ValueError(f"it starts with {bytes(head[:8])!r}, neither a PNG nor a JPEG signature")
    except (ValueError, struct.error) as exc:
        raise _fail(field, f"{field} is not a readable PNG or JPEG: {exc}") from None
    if width < 1 or height < 1:
        raise _fail(field, f"{field} claims a size of {width}x{height} pixels")
    return kind, width, height


def _image_buffer(value: Any, field_path: str, png_only: bool) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(field_path, f"{field_path} must be a bytes buffer holding a PNG or JPEG file, got {type(value).__name__}")
    size = memoryview(value).nbytes
    if size > MAX_IMAGE_BYTES:
        raise _fail(field_path, f"{field_path} is {size} bytes; at most {MAX_IMAGE_BYTES} are allowed")
    kind, width, height = image_info(value, field_path)
    if png_only and kind != "png":
        raise _fail(field_path, f"{field_path} must be a PNG, got a {kind.upper()}")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise _fail(field_path, f"{field_path} is {width}x{height} pixels; at most {MAX_IMAGE_SIDE} per side")


# ---------------------------------------------------------------------------------------------
# mesh buffers


def _array(value: Any, field_path: str, dtype: str, columns: int, rows: int | None = None) -> np.ndarray:
    """A little-endian numpy buffer of `dtype` ("f4", "i4") and shape [rows, columns] (rows >= 1)."""
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype("<" + dtype):
        shown = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise _fail(field_path, f"{field_path} must be a {dtype} array, got {shown}")
    wanted = f"[{'N' if rows is None else rows}, {columns}]"
    if value.ndim != 2 or value.shape[1] != columns or (rows is not None and value.shape[0] != rows):
        raise _fail(field_path, f"{field_path} must have shape {wanted}, got {list(value.shape)}")
    if value.shape[0] < 1:
        raise _fail(field_path, f"{field_path} is empty")
    return value


def _mesh_buffers(buffers: Mapping[str, Any]) -> None:
    for name in ("positions", "faces"):
        if name not in buffers:
            raise _fail(f"buffers.{name}", f"refine_texture needs the buffer {name!r}")
    positions_nx3 = _array(buffers["positions"], "buffers.positions", "f4", 3)
    if not np.isfinite(positions_nx3).all():
        raise _fail("buffers.positions", "buffers.positions holds NaN or infinite values")
    faces_mx3 = _array(buffers["faces"], "buffers.faces", "i4", 3)
    count = positions_nx3.shape[0]
    low, high = int(faces_mx3.min()), int(faces_mx3.max())
    if low < 0 or high >= count:
        bad = low if low < 0 else high
        raise _fail("buffers.faces", f"buffers.faces holds vertex index {bad}; indices must be in [0, {count})")
    if "uvs" in buffers:
        uvs_nx2 = _array(buffers["uvs"], "buffers.uvs", "f4", 2, rows=count)
        if not np.isfinite(uvs_nx2).all():
            raise _fail("buffers.uvs", "buffers.uvs holds NaN or infinite values")
    if "texture" in buffers:
        _image_buffer(buffers["texture"], "buffers.texture", png_only=True)


# ---------------------------------------------------------------------------------------------
# public


def validate_submit(kind: Any, params: Any, buffers: Mapping[str, Any]) -> JobParams:
    """Checked, defaults-filled parameters of a `submit`; ProtocolError("bad_params") names the field."""
    if kind not in JOB_KINDS:
        raise _fail("kind", f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
    raw = _map(params, "params")
    for name in buffers:
        if name not in KIND_BUFFERS[kind]:
            raise _fail(f"buffers.{name}", f"a {kind} job takes the buffers {', '.join(KIND_BUFFERS[kind])}; "
                                           f"got {name!r}")
    has_image = "image" in buffers
    if kind == JobKind.GENERATE:
        target_faces = raw.get("target_faces")
        if target_faces is not None:
            target_faces = _integer(target_faces, "params.target_faces", 0, MAX_TARGET_FACES)
        result: JobParams = GenerateParams(**_common_fields(raw, ("coarse", "geometry", "texture"), has_image),
                                           target_faces=target_faces)
    else:
        result = RefineParams(**_common_fields(raw, ("texture",), has_image))
        _mesh_buffers(buffers)
    if "image" in buffers:
        _image_buffer(buffers["image"], "buffers.image", png_only=False)
    return result


def validate_request_id(value: Any) -> str | None:
    """A `submit`'s optional client `request_id` (None when absent); ProtocolError names it."""
    if value is None or (isinstance(value, str) and REQUEST_ID_RE.fullmatch(value)):
        return value
    raise ProtocolError(
        ErrorCode.BAD_MESSAGE, f"request_id must be 1 to 64 letters, digits or ._:- characters, got {value!r}",
        "request_id",
    )


def params_to_dict(p: JobParams) -> dict[str, Any]:
    """A plain msgpack-able dict that `validate_submit` turns back into an equal `p`."""
    camera = p.camera
    steps = {k: v for k, v in vars(p.steps).items() if v is not None}
    face_budget = {} if getattr(p, "target_faces", None) is None else {"target_faces": p.target_faces}
    return {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        "camera": {
            "reference": dict(vars(camera.reference)),
            "elevation_deg": list(camera.elevation_deg),
            "azimuth_deg": list(camera.azimuth_deg),
            "distance": list(camera.distance),
            "fov_deg": list(camera.fov_deg),
        },
        "quality": p.quality,
        "distill": p.distill,
        "steps": steps,
        "seed": p.seed,
        "texture_size": p.texture_size,
        "mesh_every": p.mesh_every,
        "preview_every": p.preview_every,
        **face_budget,
    }

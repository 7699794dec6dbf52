"""A job's inputs made ready for the stages: the prompt, the reference image, the input mesh.

`refine_texture` jobs bring a mesh in the artist's coordinates. The stages work in the scene's
normalised frame (objects inside [-0.5, 0.5]^3), so the mesh is normalised for optimisation while
its original positions are kept for the result: a refined mesh comes back exactly where it was.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class InputMesh:
    """A refine job's mesh: original positions plus the normalised copy the stages optimise on."""

    verts_vx3: np.ndarray
    """Positions as sent (the artist's coordinates), float32 [V, 3]."""
    faces_fx3: np.ndarray
    """Triangles, int32 [F, 3]."""
    uvs_vx2: np.ndarray | None
    """One UV per vertex as sent, float32 [V, 2], or None (UVs are then made with xatlas)."""
    texture_rgb: np.ndarray | None
    """The sent texture, uint8 [H, W, 3] row 0 at the top, or None."""
    normalised_vx3: np.ndarray
    """`(verts - centre) * scale`: the same vertices inside [-0.5, 0.5]^3, float32 [V, 3]."""


def decode_png_rgb(data: bytes, field: str) -> np.ndarray:
    """uint8 [H, W, 3] of a PNG/JPEG buffer; a broken or oversized file raises ValueError naming `field`."""
    from PIL import Image

    from protocol.params import MAX_IMAGE_SIDE

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            # The size the decoder will produce, whatever the file's first header said.
            if max(image.size) > MAX_IMAGE_SIDE:
                raise ValueError(f"it decodes to {image.size[0]}x{image.size[1]} pixels; at most {MAX_IMAGE_SIDE} per side")
            return np.array(image.convert("RGB"))  # a writable copy (torch warns on read-only)
    except Exception as exc:  # PIL raises several types for a broken file
        raise ValueError(f"{field}: the image cannot be decoded ({exc})") from exc


def input_mesh(inputs: dict[str, Any]) -> InputMesh:
    """The refine buffers (positions, faces, optional uvs and texture) as an `InputMesh`."""
    from backend.meshio import mesh_from_arrays, normalize_to_unit_box

    mesh = mesh_from_arrays(inputs["positions"], inputs["faces"], source="buffers")
    uvs = inputs.get("uvs")
    texture = inputs.get("texture")
    normalised_vx3, _, _ = normalize_to_unit_box(mesh.verts_vx3)
    return InputMesh(
        verts_vx3=mesh.verts_vx3,
        faces_fx3=mesh.faces_fx3,
        uvs_vx2=None if uvs is None else np.asarray(uvs, dtype=np.float32),
        texture_rgb=None if texture is None else decode_png_rgb(texture, "buffers.texture"),
        normalised_vx3=normalised_vx3,
    )


def tensor(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A numpy array as a tensor of `dtype` on `device`."""
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

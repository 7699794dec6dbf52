"""Streaming a job's progress: mesh events, PNG previews and the cadence they follow.

Meshes are emitted every `mesh_every` steps of every stage, once early (`first_mesh_at`), and at
the end of each stage (so a short stage still streams its result); previews ride on `progress` every `preview_every` steps.
Positions are emitted as they are: our internal frame is Blender's (metres, Z up, the object
faces -Y, PROTOCOL.md section 8), objects inside the unit box.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class EventSink(Protocol):
    """The part of `backend.jobs.JobContext` the streaming helpers use."""

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int: ...

    def progress(
        self,
        stage: str,
        step: int,
        steps: int,
        eta_s: float | None = None,
        losses: dict[str, float] | None = None,
        preview_png: bytes | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Cadence:
    """When, within a stage of `steps` steps, to stream a mesh, a preview or a checkpoint."""

    steps: int
    """Steps in the stage."""
    mesh_every: int
    """A mesh after every this many steps, and after the last step."""
    preview_every: int
    """A preview after every this many steps, and after the last step."""
    checkpoint_every: int
    """A checkpoint after every this many steps (the stage start has its own)."""
    first_mesh_at: int = 0
    """One early mesh after this many steps (0: none)."""

    def mesh_due(self, step: int) -> bool:
        """After 0-based `step`: is a mesh due?"""
        done = step + 1
        return done % self.mesh_every == 0 or done == self.steps or done == self.first_mesh_at

    def preview_due(self, step: int) -> bool:
        done = step + 1
        return done % self.preview_every == 0 or done == self.steps

    def checkpoint_due(self, step: int) -> bool:
        done = step + 1
        return done % self.checkpoint_every == 0 and done < self.steps


def _numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().to("cpu").numpy()
    return np.asarray(array)


def emit_mesh(
    sink: EventSink,
    stage: str,
    step: int,
    verts_vx3: Tensor | np.ndarray,
    faces_fx3: Tensor | np.ndarray,
    *,
    final: bool = False,
    uvs_vx2: Tensor | np.ndarray | None = None,
    texture_png: bytes | None = None,
    colors_vx3: Tensor | np.ndarray | None = None,
) -> int:
    """Emit one `mesh` event (positions f4, faces i4, optional uvs f4, texture PNG, colours u1);
    returns its seq."""
    positions = np.ascontiguousarray(_numpy(verts_vx3), dtype="<f4")
    faces = np.ascontiguousarray(_numpy(faces_fx3), dtype="<i4")
    buffers: dict[str, Any] = {"positions": positions, "faces": faces}
    if uvs_vx2 is not None:
        buffers["uvs"] = np.ascontiguousarray(_numpy(uvs_vx2), dtype="<f4")
    if texture_png is not None:
        buffers["texture"] = bytes(texture_png)
    if colors_vx3 is not None:
        colors = _numpy(colors_vx3)
        if colors.dtype != np.uint8:
            colors = np.clip(np.round(colors * 255.0), 0, 255).astype(np.uint8)
        buffers["colors"] = np.ascontiguousarray(colors)
    if len(positions):
        bbox = [positions.min(axis=0).tolist(), positions.max(axis=0).tolist()]
    else:
        bbox = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    body = {
        "stage": stage,
        "step": int(step),
        "final": bool(final),
        "vertex_count": int(len(positions)),
        "face_count": int(len(faces)),
        "bbox": bbox,
    }
    return sink.emit("mesh", body, buffers)


def png_bytes(rgb_hxwx3: Tensor | np.ndarray) -> bytes:
    """PNG of a float image in [0, 1] (or uint8), [H, W, 3], row 0 at the top."""
    from PIL import Image

    image = _numpy(rgb_hxwx3)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def preview_png(rgb_bxhxwx3: Tensor) -> bytes:
    """The renders of a batch side by side, as one PNG."""
    row_hxbwx3 = torch.cat(list(rgb_bxhxwx3.detach().float().clamp(0, 1)), dim=1)
    return png_bytes(row_hxbwx3)

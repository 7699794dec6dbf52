"""The mesh budget: a surface decimated to a face count before UV unwrapping.

The DMTet surface of a generated job has a few hundred thousand triangles (128³ or 192³ grids),
far more than an artist wants and more than xatlas can chart in seconds. `decimate` brings it to
`target_faces` with quadric edge collapse (`fast_simplification`, a wrapper of Sven Forstmann's
Fast-Quadric-Mesh-Simplification; chosen over `pyfqmr`, which wraps the same algorithm, by the
measurements in docs/benchmarks.md), keeping the open borders of a surface where it has them, so
silhouettes and holes keep their outline. It runs in a worker process (`backend.worker`) so a
cancel stops it within a fraction of a second.

The budget is clamped, never refused, once the work is done (the notes say what happened):
below `MIN_FACES` it is raised to `MIN_FACES`; at or above the surface's own count the surface
is kept whole; `0` keeps it whole without a note. A surface the simplifier cannot bring near the
budget (degenerate or non-manifold places block the collapses) is used as far as it got, and one
it breaks (no faces left, non-finite positions) is kept as it was; both with a note.

This module imports no torch: the worker loads it in a fraction of a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MIN_FACES = 500
"""The smallest budget that still holds a shape; smaller ones are raised to it."""
REACHED_SLACK = 1.1
"""A result with more than this many times the budget's faces gets a note: the budget was not
reached."""
AGGRESSIVENESS = 7.0
"""The simplifier's threshold growth per pass: its default, measured no worse than 3 on our
surfaces and as fast (docs/benchmarks.md)."""


@dataclass
class Decimated:
    """A surface after the budget was applied."""

    verts_vx3: np.ndarray
    """Positions float32 [V, 3]."""
    faces_fx3: np.ndarray
    """Triangles int32 [F, 3], counter-clockwise as the input's."""
    faces_in: int
    """Faces of the surface before."""
    seconds: float = 0.0
    """Wall time of the simplifier (0 when it did not run)."""
    notes: list[str] = field(default_factory=list)
    """What the budget did that the artist should know: clamps, a budget not reached."""


def face_budget(target_faces: int, faces_in: int) -> tuple[int, list[str]]:
    """The face count to simplify to (`faces_in`: keep the surface whole) and the notes on it."""
    if isinstance(target_faces, bool) or not isinstance(target_faces, int) or target_faces < 0:
        raise ValueError(f"target_faces must be an integer >= 0, got {target_faces!r}")
    if target_faces == 0:
        return faces_in, []
    notes = []
    target = target_faces
    if target < MIN_FACES:
        target = MIN_FACES
        notes.append(f"target_faces {target_faces:,} is below the {MIN_FACES:,} faces that hold "
                     f"a shape; using {MIN_FACES:,}")
    if target >= faces_in:
        notes.append(f"target_faces {target:,} is not below the surface's {faces_in:,} faces; "
                     "keeping all of them")
        return faces_in, notes
    return target, notes


def simplify(verts_vx3: np.ndarray, faces_fx3: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge collapse of a triangle mesh towards `target_faces` faces, open borders kept.

    Returns (verts float32 [V', 3], faces int32 [F', 3]); F' may stay above the target where
    the mesh blocks collapses. What the worker runs.
    """
    import fast_simplification

    verts, faces = fast_simplification.simplify(
        np.ascontiguousarray(verts_vx3, dtype=np.float64), np.ascontiguousarray(faces_fx3, dtype=np.int32),
        target_count=target_faces, agg=AGGRESSIVENESS, preserve_border=True)
    return np.asarray(verts, dtype=np.float32), np.asarray(faces, dtype=np.int32).reshape(-1, 3)


def decimate(verts_vx3, faces_fx3, target_faces: int,
             check_cancelled: Callable[[], None] | None = None) -> Decimated:
    """The surface (numpy arrays or tensors) brought to `target_faces` (see the module docstring);
    `check_cancelled` is polled while the simplifier runs and stops it by raising."""
    from backend.worker import call_stoppable, never_cancelled

    verts = _numpy(verts_vx3).astype(np.float32)
    faces = _numpy(faces_fx3).astype(np.int32)
    if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"decimate needs verts [V, 3] and faces [F>0, 3], got {list(verts.shape)} and {list(faces.shape)}")
    target, notes = face_budget(target_faces, len(faces))
    if target >= len(faces):
        return Decimated(verts, faces, len(faces), notes=notes)
    started = time.perf_counter()
    out_verts, out_faces = call_stoppable("backend.decimate:simplify",
                                          dict(verts_vx3=verts, faces_fx3=faces, target_faces=target),
                                          check_cancelled or never_cancelled)
    seconds = time.perf_counter() - started
    if len(out_faces) == 0 or not np.isfinite(out_verts).all():
        notes.append(f"the simplifier could not reduce this surface ({len(faces):,} faces; it may "
                     "be non-manifold or self-intersecting); keeping all of its faces")
        return Decimated(verts, faces, len(faces), seconds, notes)
    if len(out_faces) > REACHED_SLACK * target:
        notes.append(f"the simplifier stopped at {len(out_faces):,} of the {target:,} faces asked "
                     f"for (from {len(faces):,}): degenerate or non-manifold places in the surface "
                     "block further collapses")
    return Decimated(out_verts, out_faces, len(faces), seconds, notes)


def _numpy(array) -> np.ndarray:
    """A numpy array from a numpy array or a tensor (without importing torch)."""
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)

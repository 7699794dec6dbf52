"""Mesh arrays between the wire format and Blender's loops, in plain numpy.

The backend sends one UV per vertex, so vertices are split along UV seams (PROTOCOL.md section 8).
Blender stores UVs per loop (face corner) instead, so the importer welds split vertices by exact
position and keeps each corner's UV. The reverse, for Refine texture, splits Blender's vertices
wherever two corners of one vertex carry different UVs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MeshDataError(ValueError):
    """A mesh buffer has the wrong dtype, shape or index range; the message names the buffer."""


@dataclass
class WeldedMesh:
    """A triangle mesh ready for Blender: shared vertices, UVs per face corner."""

    verts_vx3: np.ndarray
    """float32 [V, 3] unique vertex positions, Blender world axes, metres."""
    faces_fx3: np.ndarray
    """int32 [F, 3] indices into `verts_vx3`, counter-clockwise seen from outside."""
    loop_uvs_lx2: np.ndarray | None
    """float32 [3F, 2] UV of each face corner in face order, or None when the mesh had no UVs."""
    loop_colors_lx3: np.ndarray | None
    """float32 [3F, 3] colour in [0, 1] of each face corner, or None when the mesh had no colours."""
    source_index_v: np.ndarray
    """int64 [V] for each welded vertex, one of the input vertices it came from."""


@dataclass
class SplitMesh:
    """A triangle mesh in the wire format: one UV per vertex, vertices split along UV seams."""

    positions_nx3: np.ndarray
    """float32 [N, 3] vertex positions, object space, metres."""
    faces_mx3: np.ndarray
    """int32 [M, 3] indices into `positions_nx3`."""
    uvs_nx2: np.ndarray | None
    """float32 [N, 2] UV per vertex, or None when the mesh had no UV map."""


def check_triangles(positions_nx3: np.ndarray, faces_mx3: np.ndarray) -> None:
    """Raise MeshDataError naming `positions` or `faces` when they are not a valid triangle mesh."""
    if positions_nx3.ndim != 2 or positions_nx3.shape[1] != 3:
        raise MeshDataError(f"buffer 'positions' must have shape [N, 3], got {list(positions_nx3.shape)}")
    if faces_mx3.ndim != 2 or faces_mx3.shape[1] != 3:
        raise MeshDataError(f"buffer 'faces' must have shape [M, 3], got {list(faces_mx3.shape)}")
    bad_indices = faces_mx3[(faces_mx3 < 0) | (faces_mx3 >= len(positions_nx3))]
    if bad_indices.size:
        raise MeshDataError(
            f"buffer 'faces' holds index {int(bad_indices[0])} outside 0..{len(positions_nx3) - 1}"
        )
    if not np.isfinite(positions_nx3).all():
        raise MeshDataError("buffer 'positions' holds a NaN or infinite coordinate")


def weld(
    positions_nx3: np.ndarray,
    faces_mx3: np.ndarray,
    uvs_nx2: np.ndarray | None = None,
    colors_nx3: np.ndarray | None = None,
) -> WeldedMesh:
    """Merge vertices with exactly equal positions; carry UVs and colours over to face corners.

    Triangles that collapse (two corners on one welded vertex) are dropped, since Blender cannot
    hold them.
    """
    positions_nx3 = np.ascontiguousarray(positions_nx3, dtype=np.float32)
    faces_mx3 = np.ascontiguousarray(faces_mx3, dtype=np.int64)
    check_triangles(positions_nx3, faces_mx3)
    if uvs_nx2 is not None and uvs_nx2.shape != (len(positions_nx3), 2):
        raise MeshDataError(f"buffer 'uvs' must have shape [{len(positions_nx3)}, 2], got {list(uvs_nx2.shape)}")
    if colors_nx3 is not None and colors_nx3.shape != (len(positions_nx3), 3):
        raise MeshDataError(
            f"buffer 'colors' must have shape [{len(positions_nx3)}, 3], got {list(colors_nx3.shape)}"
        )

    # 1. One welded vertex per distinct position (exact match: seam copies are bit-identical).
    verts_vx3, first_index_v, welded_of_n = np.unique(
        positions_nx3, axis=0, return_index=True, return_inverse=True
    )
    welded_of_n = welded_of_n.reshape(-1)

    # 2. Faces on welded vertices; drop the ones that collapsed.
    welded_faces_mx3 = welded_of_n[faces_mx3]
    keep_m = (
        (welded_faces_mx3[:, 0] != welded_faces_mx3[:, 1])
        & (welded_faces_mx3[:, 1] != welded_faces_mx3[:, 2])
        & (welded_faces_mx3[:, 0] != welded_faces_mx3[:, 2])
    )
    kept_source_faces_fx3 = faces_mx3[keep_m]

    # 3. Corner attributes come from the original (split) vertex of each corner.
    corner_sources_l = kept_source_faces_fx3.reshape(-1)
    loop_uvs = None if uvs_nx2 is None else uvs_nx2.astype(np.float32)[corner_sources_l]
    loop_colors = None
    if colors_nx3 is not None:
        loop_colors = (colors_nx3.astype(np.float32) / 255.0)[corner_sources_l]
    return WeldedMesh(
        verts_vx3=verts_vx3.astype(np.float32),
        faces_fx3=welded_faces_mx3[keep_m].astype(np.int32),
        loop_uvs_lx2=loop_uvs,
        loop_colors_lx3=loop_colors,
        source_index_v=first_index_v.astype(np.int64),
    )


def split_by_uv(
    verts_vx3: np.ndarray, tri_verts_tx3: np.ndarray, tri_loop_uvs_tx3x2: np.ndarray | None
) -> SplitMesh:
    """Blender triangles (vertex indices plus a UV per corner) to one UV per vertex.

    A vertex gets one copy per distinct UV among its corners, so the geometry is unchanged and
    welding the result by position gives the input vertex count back.
    """
    verts_vx3 = np.ascontiguousarray(verts_vx3, dtype=np.float32)
    tri_verts_tx3 = np.ascontiguousarray(tri_verts_tx3, dtype=np.int64)
    check_triangles(verts_vx3, tri_verts_tx3)
    if tri_loop_uvs_tx3x2 is None:
        return SplitMesh(verts_vx3, tri_verts_tx3.astype(np.int32), None)

    # 1. Key each corner by (vertex, u, v); equal keys share one output vertex.
    corner_vertex_l = tri_verts_tx3.reshape(-1)
    corner_uv_lx2 = np.ascontiguousarray(tri_loop_uvs_tx3x2, dtype=np.float32).reshape(-1, 2)
    keys = np.empty(len(corner_vertex_l), dtype=[("v", np.int64), ("u", np.float32), ("w", np.float32)])
    keys["v"], keys["u"], keys["w"] = corner_vertex_l, corner_uv_lx2[:, 0], corner_uv_lx2[:, 1]
    unique_keys, new_index_l = np.unique(keys, return_inverse=True)

    # 2. Vertices no triangle uses keep no UV; the wire format wants every vertex, so they go.
    positions_nx3 = verts_vx3[unique_keys["v"]]
    uvs_nx2 = np.stack([unique_keys["u"], unique_keys["w"]], axis=1).astype(np.float32)
    return SplitMesh(positions_nx3, new_index_l.reshape(-1, 3).astype(np.int32), uvs_nx2)


def bbox(verts_vx3: np.ndarray) -> list[list[float]]:
    """[[min x, y, z], [max x, y, z]] of the vertices (zeros for an empty mesh)."""
    if len(verts_vx3) == 0:
        return [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    return [verts_vx3.min(axis=0).tolist(), verts_vx3.max(axis=0).tolist()]

"""Mesh arrays between the wire format and Blender's loops, in plain numpy.

The backend sends one UV per vertex, so vertices are split along UV seams (PROTOCOL.md section 8).
Blender stores UVs per loop (face corner) instead, so the importer welds split vertices by exact
position and keeps each corner's UV. The reverse, for Refine texture, splits Blender's vertices
wherever two corners of one vertex carry different UVs.

`prepare_mesh_event` does all of a `mesh` event's array work (checks, welding, edges, corner
attributes) without bpy, so the add-on runs it on a worker thread; the main thread only copies
the finished arrays into Blender with `foreach_set`. Rows are grouped by sorting integer keys
(`group_rows`), several times faster than `np.unique(axis=0)` on large meshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The first eight bytes of every PNG file."""


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
class BlenderMesh:
    """A mesh event laid out the way Blender stores a mesh, ready for `foreach_set`."""

    verts_vx3: np.ndarray
    """float32 [V, 3] vertex positions (the `position` attribute)."""
    corner_verts_l: np.ndarray
    """int32 [3F] vertex of each face corner (the `.corner_vert` attribute)."""
    corner_edges_l: np.ndarray
    """int32 [3F] edge from each corner to the next one of its face (the `.corner_edge` attribute)."""
    edge_verts_ex2: np.ndarray
    """int32 [E, 2] the two vertices of each edge (the `.edge_verts` attribute)."""
    loop_starts_f: np.ndarray
    """int32 [F] first corner of each (triangular) face."""
    loop_uvs_lx2: np.ndarray | None
    """float32 [3F, 2] UV of each corner, or None."""
    loop_colors_lx4: np.ndarray | None
    """float32 [3F, 4] RGBA in [0, 1] of each corner, or None."""
    texture_png: bytes | None
    """The event's texture, checked to be a PNG, or None."""

    @property
    def face_count(self) -> int:
        """Number of triangles."""
        return len(self.loop_starts_f)


@dataclass
class RefineResult:
    """The final mesh of a refine job, checked, with its UVs per triangle corner."""

    face_count: int
    """Number of triangles (must equal the object's loop triangles)."""
    corner_uvs_lx2: np.ndarray | None
    """float32 [3M, 2] UV of each triangle corner in triangle order, or None."""
    texture_png: bytes | None
    """The refined texture (a PNG), or None."""


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


def group_rows(*keys_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group rows whose integer keys are all equal: (first_index_g, group_of_n).

    `first_index_g[g]` is a row of group g; `group_of_n[i]` is row i's group. Groups are numbered
    in key order (like `np.unique`), found with one sort instead of `np.unique(axis=0)`.
    """
    order_n = np.lexsort(keys_n[::-1]) if len(keys_n) > 1 else np.argsort(keys_n[0], kind="stable")
    starts_n = np.zeros(len(order_n), dtype=bool)
    if len(order_n):
        starts_n[0] = True
        for key_n in keys_n:
            sorted_n = key_n[order_n]
            starts_n[1:] |= sorted_n[1:] != sorted_n[:-1]
    group_of_n = np.empty(len(order_n), dtype=np.int64)
    group_of_n[order_n] = np.cumsum(starts_n) - 1
    return order_n[starts_n], group_of_n


def _float_bits(values: np.ndarray) -> np.ndarray:
    """uint64 bit patterns of float32 values, -0.0 counted as 0.0 (so equal values share a key)."""
    return (np.ascontiguousarray(values, dtype=np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)


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
    bits_nx3 = _float_bits(positions_nx3)
    first_index_v, welded_of_n = group_rows((bits_nx3[:, 0] << 32) | bits_nx3[:, 1], bits_nx3[:, 2])
    verts_vx3 = positions_nx3[first_index_v]

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
    loop_uvs = None if uvs_nx2 is None else np.asarray(uvs_nx2, np.float32)[corner_sources_l]
    loop_colors = None
    if colors_nx3 is not None:
        loop_colors = (np.asarray(colors_nx3, np.float32) / 255.0)[corner_sources_l]
    return WeldedMesh(
        verts_vx3=verts_vx3,
        faces_fx3=welded_faces_mx3[keep_m].astype(np.int32),
        loop_uvs_lx2=loop_uvs,
        loop_colors_lx3=loop_colors,
        source_index_v=first_index_v.astype(np.int64),
    )


def triangle_edges(faces_fx3: np.ndarray, vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(edge_verts_ex2, corner_edges_l) of a triangle mesh, as Blender stores them.

    Corner i of a face owns the edge to corner i + 1 (the last corner: to the first).
    """
    corner_from_l = faces_fx3.reshape(-1).astype(np.int64)
    corner_to_l = np.roll(faces_fx3, -1, axis=1).reshape(-1).astype(np.int64)
    low_l, high_l = np.minimum(corner_from_l, corner_to_l), np.maximum(corner_from_l, corner_to_l)
    first_corner_e, edge_of_l = group_rows(low_l * max(vertex_count, 1) + high_l)
    edge_verts_ex2 = np.stack([low_l[first_corner_e], high_l[first_corner_e]], axis=1).astype(np.int32)
    return edge_verts_ex2, edge_of_l.astype(np.int32)


def _buffer(buffers: dict, name: str, dtype_kind: str, columns: int, rows: int | None = None) -> np.ndarray:
    """A mesh event buffer as a 2-D array, checked for its kind of dtype and its shape."""
    array = np.asarray(buffers[name])
    if array.dtype.kind not in dtype_kind:
        raise MeshDataError(f"buffer {name!r} has dtype {array.dtype.str}, expected one of kind {dtype_kind!r}")
    if array.ndim != 2 or array.shape[1] != columns or (rows is not None and array.shape[0] != rows):
        expected = f"[{'N' if rows is None else rows}, {columns}]"
        raise MeshDataError(f"buffer {name!r} must have shape {expected}, got {list(array.shape)}")
    return array


def _checked_event_buffers(buffers: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bytes | None]:
    """positions, faces, uvs and texture of a mesh event, checked (MeshDataError names the buffer)."""
    for name in ("positions", "faces"):
        if buffers.get(name) is None:
            raise MeshDataError(f"the mesh event has no buffer {name!r}")
    positions_nx3 = _buffer(buffers, "positions", "f", 3)
    faces_mx3 = _buffer(buffers, "faces", "iu", 3)
    check_triangles(positions_nx3, faces_mx3)
    uvs_nx2 = None if buffers.get("uvs") is None else _buffer(buffers, "uvs", "f", 2, len(positions_nx3))
    if uvs_nx2 is not None and not np.isfinite(uvs_nx2).all():
        raise MeshDataError("buffer 'uvs' holds a NaN or infinite coordinate")
    texture = buffers.get("texture")
    texture_png = None if texture is None else bytes(texture)
    if texture_png is not None and not texture_png.startswith(PNG_SIGNATURE):
        raise MeshDataError(f"buffer 'texture' is not a PNG: it starts with {texture_png[:8]!r}")
    return positions_nx3, faces_mx3, uvs_nx2, texture_png


def prepare_refine_result(buffers: dict) -> RefineResult:
    """Check a refine job's final mesh event and put its UVs per triangle corner (no bpy)."""
    _positions_nx3, faces_mx3, uvs_nx2, texture_png = _checked_event_buffers(buffers)
    corner_uvs = None if uvs_nx2 is None else np.ascontiguousarray(uvs_nx2[faces_mx3.reshape(-1)], np.float32)
    return RefineResult(face_count=len(faces_mx3), corner_uvs_lx2=corner_uvs, texture_png=texture_png)


def prepare_mesh_event(buffers: dict) -> BlenderMesh:
    """Check and convert a `mesh` event's buffers into Blender's layout (no bpy; any thread).

    Raises MeshDataError naming the buffer when something is wrong, so nothing bad reaches bpy:
    a missing buffer, a wrong dtype or shape, an index out of range, NaN or infinite numbers, a
    texture that is not a PNG. A texture wins over vertex colours (PROTOCOL.md section 4).
    """
    positions_nx3, faces_mx3, uvs_nx2, texture_png = _checked_event_buffers(buffers)
    colors_nx3 = None
    if buffers.get("colors") is not None and texture_png is None:
        colors_nx3 = _buffer(buffers, "colors", "u", 3, len(positions_nx3))
    welded = weld(positions_nx3, faces_mx3, uvs_nx2, colors_nx3)
    edge_verts_ex2, corner_edges_l = triangle_edges(welded.faces_fx3, len(welded.verts_vx3))
    loop_colors_lx4 = None
    if welded.loop_colors_lx3 is not None:
        alpha_lx1 = np.ones((len(welded.loop_colors_lx3), 1), np.float32)
        loop_colors_lx4 = np.ascontiguousarray(np.concatenate([welded.loop_colors_lx3, alpha_lx1], axis=1))
    return BlenderMesh(
        verts_vx3=np.ascontiguousarray(welded.verts_vx3),
        corner_verts_l=np.ascontiguousarray(welded.faces_fx3.reshape(-1)),
        corner_edges_l=corner_edges_l,
        edge_verts_ex2=edge_verts_ex2,
        loop_starts_f=np.arange(0, 3 * len(welded.faces_fx3), 3, dtype=np.int32),
        loop_uvs_lx2=None if welded.loop_uvs_lx2 is None else np.ascontiguousarray(welded.loop_uvs_lx2),
        loop_colors_lx4=loop_colors_lx4,
        texture_png=texture_png,
    )


def fan_triangles(tri_polys_t: np.ndarray, poly_count: int) -> np.ndarray:
    """int64 [T, 3] corners of each triangle when every polygon is fanned from its first corner.

    `tri_polys_t` is the polygon of each of Blender's loop triangles (`loop_triangle_polygons`,
    grouped by polygon in order; a polygon of n corners has n - 2 of them). It is read in
    milliseconds where `loop_triangles.foreach_get("loops")` takes most of a second on large
    meshes, and it gives each polygon's size, hence its first corner; the export and the
    import of Refine texture both use this fan, so a result maps back triangle by triangle.
    """
    tri_polys_t = np.asarray(tri_polys_t, dtype=np.int64)
    if len(tri_polys_t) and np.any(np.diff(tri_polys_t) < 0):
        raise MeshDataError("loop triangles are not grouped by polygon")
    tris_per_poly_p = np.bincount(tri_polys_t, minlength=poly_count)
    corner_start_p = np.cumsum(tris_per_poly_p + 2) - (tris_per_poly_p + 2)
    first_tri_p = np.cumsum(tris_per_poly_p) - tris_per_poly_p
    index_in_poly_t = np.arange(len(tri_polys_t)) - first_tri_p[tri_polys_t]
    start_t = corner_start_p[tri_polys_t]
    return np.stack([start_t, start_t + index_in_poly_t + 1, start_t + index_in_poly_t + 2], axis=1)


def refine_split(
    verts_vx3: np.ndarray,
    corner_verts_l: np.ndarray,
    tri_polys_t: np.ndarray,
    poly_count: int,
    loop_uvs_lx2: np.ndarray | None,
) -> SplitMesh:
    """A Blender mesh's arrays (positions, `.corner_vert`, loop-triangle polygons, UVs per
    corner) to the wire format for Refine texture: fanned triangles, split by UV (no bpy)."""
    tri_corners_tx3 = fan_triangles(tri_polys_t, poly_count)
    if len(tri_corners_tx3) and tri_corners_tx3.max() >= len(corner_verts_l):
        raise MeshDataError(f"the loop triangles reach corner {int(tri_corners_tx3.max())} of {len(corner_verts_l)}")
    tri_verts_tx3 = np.asarray(corner_verts_l)[tri_corners_tx3]
    tri_uvs = None if loop_uvs_lx2 is None else np.asarray(loop_uvs_lx2)[tri_corners_tx3]
    return split_by_uv(verts_vx3, tri_verts_tx3, tri_uvs)


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
    uv_bits_lx2 = _float_bits(corner_uv_lx2)
    first_corner_n, new_index_l = group_rows(corner_vertex_l, (uv_bits_lx2[:, 0] << 32) | uv_bits_lx2[:, 1])

    # 2. Vertices no triangle uses keep no UV; the wire format wants every vertex, so they go.
    positions_nx3 = verts_vx3[corner_vertex_l[first_corner_n]]
    uvs_nx2 = corner_uv_lx2[first_corner_n]
    return SplitMesh(positions_nx3, new_index_l.reshape(-1, 3).astype(np.int32), uvs_nx2)


def bbox(verts_vx3: np.ndarray) -> list[list[float]]:
    """[[min x, y, z], [max x, y, z]] of the vertices (zeros for an empty mesh)."""
    if len(verts_vx3) == 0:
        return [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    return [verts_vx3.min(axis=0).tolist(), verts_vx3.max(axis=0).tolist()]

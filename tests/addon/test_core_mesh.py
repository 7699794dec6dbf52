"""Welding seam-split meshes and splitting Blender loops by UV, on the real shared meshes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blender_addon.core.mesh import MeshDataError, split_by_uv, weld

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def read_obj_with_uvs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices [V,3], triangles [T,3] of vertex indices, and UVs per corner [T,3,2]."""
    verts, uvs, tri_v, tri_uv = [], [], [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts[0] == "vt":
            uvs.append([float(x) for x in parts[1:3]])
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:]]
            for i in range(1, len(corners) - 1):
                tri = [corners[0], corners[i], corners[i + 1]]
                tri_v.append([int(c[0]) - 1 for c in tri])
                tri_uv.append([uvs[int(c[1]) - 1] for c in tri])
    return np.array(verts, np.float32), np.array(tri_v, np.int64), np.array(tri_uv, np.float32)


def test_split_then_weld_gives_spot_back():
    verts, tris, tri_uvs = read_obj_with_uvs(SHARED / "meshes" / "spot.obj")
    split = split_by_uv(verts, tris, tri_uvs)
    assert len(split.positions_nx3) > len(verts)  # spot has UV seams
    assert split.faces_mx3.dtype == np.int32
    # Every corner keeps its UV and its position.
    np.testing.assert_array_equal(split.positions_nx3[split.faces_mx3], verts[tris])
    np.testing.assert_array_equal(split.uvs_nx2[split.faces_mx3], tri_uvs)

    welded = weld(split.positions_nx3, split.faces_mx3, split.uvs_nx2)
    assert len(welded.verts_vx3) == len(np.unique(verts, axis=0))
    assert len(welded.faces_fx3) == len(tris)
    np.testing.assert_array_equal(welded.verts_vx3[welded.faces_fx3], verts[tris])
    np.testing.assert_array_equal(welded.loop_uvs_lx2.reshape(-1, 3, 2), tri_uvs)


def test_weld_drops_collapsed_triangles_and_converts_colors():
    positions = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]], np.float32)  # vertex 3 = vertex 1
    faces = np.array([[0, 1, 2], [0, 1, 3]], np.int32)  # the second collapses once welded
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
    welded = weld(positions, faces, colors_nx3=colors)
    assert welded.verts_vx3.shape == (3, 3)
    assert welded.faces_fx3.shape == (1, 3)
    np.testing.assert_allclose(welded.loop_colors_lx3, np.eye(3))


def test_split_without_uvs_keeps_vertices():
    verts, tris, _ = read_obj_with_uvs(SHARED / "meshes" / "spot.obj")
    split = split_by_uv(verts, tris, None)
    assert split.uvs_nx2 is None and len(split.positions_nx3) == len(verts)


@pytest.mark.parametrize(
    ("positions", "faces", "words"),
    [
        (np.zeros((3, 2), np.float32), np.array([[0, 1, 2]]), ["positions", "[3, 2]"]),
        (np.zeros((3, 3), np.float32), np.array([[0, 1, 3]]), ["faces", "index 3"]),
        (np.zeros((3, 3), np.float32), np.array([[0, 1, -1]]), ["faces", "index -1"]),
        (np.full((3, 3), np.nan, np.float32), np.array([[0, 1, 2]]), ["positions", "NaN"]),
    ],
)
def test_bad_mesh_names_the_buffer(positions, faces, words):
    with pytest.raises(MeshDataError) as info:
        weld(positions, faces)
    for word in words:
        assert word in str(info.value)

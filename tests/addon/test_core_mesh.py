"""Welding seam-split meshes and splitting Blender loops by UV, on the real shared meshes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blender_addon.core.mesh import (
    MeshDataError,
    group_rows,
    prepare_mesh_event,
    split_by_uv,
    triangle_edges,
    weld,
)

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


def test_group_rows_matches_numpy_unique():
    rng = np.random.default_rng(0)
    keys_nx2 = rng.integers(0, 5, (400, 2)).astype(np.int64)
    first_g, group_of_n = group_rows(keys_nx2[:, 0], keys_nx2[:, 1])
    unique_gx2, inverse_n = np.unique(keys_nx2, axis=0, return_inverse=True)
    np.testing.assert_array_equal(keys_nx2[first_g], unique_gx2)
    np.testing.assert_array_equal(group_of_n, inverse_n.reshape(-1))


def test_triangle_edges_of_spot_match_a_plain_set():
    verts, tris, _ = read_obj_with_uvs(SHARED / "meshes" / "spot.obj")
    edge_verts_ex2, corner_edges_l = triangle_edges(tris.astype(np.int32), len(verts))
    expected = {tuple(sorted((int(f[i]), int(f[(i + 1) % 3])))) for f in tris for i in range(3)}
    assert {tuple(e) for e in edge_verts_ex2.tolist()} == expected and len(edge_verts_ex2) == len(expected)
    corner_from, corner_to = tris.reshape(-1), np.roll(tris, -1, axis=1).reshape(-1)
    np.testing.assert_array_equal(np.sort(edge_verts_ex2[corner_edges_l], axis=1),
                                  np.sort(np.stack([corner_from, corner_to], 1), axis=1))


def spot_event_buffers() -> dict:
    verts, tris, tri_uvs = read_obj_with_uvs(SHARED / "meshes" / "spot.obj")
    split = split_by_uv(verts, tris, tri_uvs)
    texture = (SHARED / "meshes" / "spot_texture.png").read_bytes()
    return {"positions": split.positions_nx3, "faces": split.faces_mx3, "uvs": split.uvs_nx2, "texture": texture}


def test_prepare_mesh_event_lays_spot_out_for_blender():
    verts, tris, tri_uvs = read_obj_with_uvs(SHARED / "meshes" / "spot.obj")
    mesh = prepare_mesh_event(spot_event_buffers())
    assert mesh.face_count == len(tris) and len(mesh.verts_vx3) == len(verts)
    np.testing.assert_array_equal(mesh.verts_vx3[mesh.corner_verts_l].reshape(-1, 3, 3), verts[tris])
    np.testing.assert_array_equal(mesh.loop_uvs_lx2.reshape(-1, 3, 2), tri_uvs)
    np.testing.assert_array_equal(mesh.loop_starts_f, np.arange(0, 3 * len(tris), 3))
    assert mesh.texture_png.startswith(b"\x89PNG") and mesh.loop_colors_lx4 is None
    assert len(mesh.edge_verts_ex2) == len(verts) + len(tris) - 2  # Euler: spot is a closed genus-0 surface
    for array in (mesh.corner_verts_l, mesh.corner_edges_l, mesh.edge_verts_ex2, mesh.loop_starts_f):
        assert array.dtype == np.int32 and array.flags.c_contiguous


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda b: b.pop("faces"), ["no buffer 'faces'"]),
        (lambda b: b.update(faces=np.where(b["faces"] == 0, 10**6, b["faces"])), ["faces", "index 1000000"]),
        (lambda b: b["positions"].__setitem__((5, 1), np.nan), ["positions", "NaN"]),
        (lambda b: b["uvs"].__setitem__((2, 0), np.inf), ["uvs", "NaN or infinite"]),
        (lambda b: b.update(uvs=b["uvs"][:-1]), ["uvs", "shape"]),
        (lambda b: b.update(texture=b"GIF89a" + bytes(100)), ["texture", "not a PNG"]),
        (lambda b: b.update(positions=b["positions"].astype(np.int32)), ["positions", "dtype"]),
    ],
)
def test_prepare_mesh_event_refuses_bad_buffers(change, words):
    buffers = spot_event_buffers()
    buffers["positions"] = buffers["positions"].copy()
    buffers["uvs"] = buffers["uvs"].copy()
    change(buffers)
    with pytest.raises(MeshDataError) as info:
        prepare_mesh_event(buffers)
    for word in words:
        assert word in str(info.value)

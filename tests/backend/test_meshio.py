"""Mesh loading: real OBJ files, GLB round trips, every bad-input case, normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.export import write_glb
from backend.meshio import MeshError, load_mesh, mesh_from_arrays, normalize_to_unit_box

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"

TRIANGLE_OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/1 2/2 3/3\n"


def test_spot_obj_loads_with_per_corner_uvs() -> None:
    mesh = load_mesh(MESHES / "spot.obj")
    assert mesh.faces_fx3.shape == (5856, 3) and mesh.faces_fx3.dtype == np.int32
    assert mesh.verts_vx3.shape == (2930, 3) and mesh.verts_vx3.dtype == np.float32
    assert mesh.uvs_fx3x2 is not None and mesh.uvs_fx3x2.shape == (5856, 3, 2)
    # Spot's file is Y up: its first vertex (0.348799, -0.334989, -0.0832331) becomes (x, -z, y).
    np.testing.assert_allclose(mesh.verts_vx3[0], [0.348799, 0.0832331, -0.334989], rtol=1e-6)
    # The first face's corners use texture coordinates 1, 2, 3 of the file.
    vt = [line.split()[1:3] for line in (MESHES / "spot.obj").read_text().splitlines() if line.startswith("vt ")]
    np.testing.assert_allclose(mesh.uvs_fx3x2[0], np.asarray(vt[:3], dtype=np.float32))


def test_obj_with_quads_is_rejected_unless_triangulated() -> None:
    with pytest.raises(MeshError, match=r"suzanne\.obj: face 0 \(line \d+\) has 4 corners"):
        load_mesh(MESHES / "suzanne.obj")
    mesh = load_mesh(MESHES / "suzanne.obj", triangulate=True)
    assert mesh.faces_fx3.shape == (32 + 2 * 468, 3)


def test_obj_with_material_loads_its_texture(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((4, 8, 3), 200, np.uint8)).save(tmp_path / "tex.png")
    (tmp_path / "m.mtl").write_text("newmtl a\nmap_Kd tex.png\n")
    (tmp_path / "m.obj").write_text("mtllib m.mtl\nusemtl a\n" + TRIANGLE_OBJ)
    mesh = load_mesh(tmp_path / "m.obj")
    assert mesh.texture_path == tmp_path / "tex.png"
    assert mesh.texture_rgb is not None and mesh.texture_rgb.shape == (4, 8, 3)


def test_glb_round_trip_keeps_positions_uvs_and_texture(tmp_path: Path) -> None:
    spot = load_mesh(MESHES / "spot.obj")
    # Split per corner so every vertex has one UV, as the GLB writer wants.
    verts_vx3 = spot.verts_vx3[spot.faces_fx3].reshape(-1, 3)
    faces_fx3 = np.arange(len(verts_vx3), dtype=np.int32).reshape(-1, 3)
    uvs_vx2 = spot.uvs_fx3x2.reshape(-1, 2)
    texture = np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)
    write_glb(tmp_path / "spot.glb", verts_vx3, faces_fx3, uvs=uvs_vx2, texture_rgb=texture)
    loaded = load_mesh(tmp_path / "spot.glb")
    assert loaded.faces_fx3.shape == (5856, 3)
    np.testing.assert_allclose(loaded.verts_vx3[loaded.faces_fx3], verts_vx3[faces_fx3], atol=1e-6)
    np.testing.assert_allclose(loaded.uvs_fx3x2, spot.uvs_fx3x2, atol=1e-6)
    np.testing.assert_array_equal(loaded.texture_rgb, texture)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.obj", "", r"empty\.obj: file is empty"),
        ("comments.obj", "# nothing here\n", r"comments\.obj: no vertices"),
        ("nofaces.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", r"nofaces\.obj: no faces"),
        ("quad.obj", "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n", r"quad\.obj: face 0 \(line 5\) has 4 corners"),
        ("line.obj", "v 0 0 0\nv 1 0 0\nf 1 2\n", r"line\.obj: face 0 \(line 3\) has 2 corners, need 3"),
        (
            "range.obj",
            "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nf 1 2 9001\n",
            r"range\.obj: face 1 \(line 5\) has index 9001 but the mesh has 3 vertices",
        ),
        ("zero.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", r"zero\.obj: face 0 \(line 4\) has index 0"),
        (
            "uvrange.obj",
            "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/2 3/3\n",
            r"uvrange\.obj: face 0 \(line 5\) has texture coordinate index 2 but the mesh has 1 texture",
        ),
        (
            "mixed.obj",
            "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1\nf 1 2 3\n",
            r"mixed\.obj: triangle 1 has no texture coordinates but other faces do",
        ),
        ("nan.obj", "v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", r"nan\.obj: vertex\[0, 2\] is nan"),
        ("text.obj", "v 0 zero 0\n", r"text\.obj: line 1: vertex has a non-number"),
        ("bad.glb", "not a glb at all", r"bad\.glb: cannot parse as glTF"),
        ("mesh.ply", "ply\n", r"mesh\.ply: unsupported file type '\.ply'"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path: Path, name: str, content: str, problem: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(MeshError, match=problem):
        load_mesh(tmp_path / name)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match=r"nowhere\.obj: file not found"):
        load_mesh(tmp_path / "nowhere.obj")


def test_degenerate_faces_and_unreferenced_vertices_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "loose.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 5 5 5\nf 1 2 3\nf 1 1 2\n")
    mesh = load_mesh(tmp_path / "loose.obj")
    assert mesh.verts_vx3.shape == (4, 3) and mesh.faces_fx3.tolist() == [[0, 1, 2], [0, 0, 1]]


def test_negative_obj_indices_count_back(tmp_path: Path) -> None:
    (tmp_path / "neg.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf -3 -2 -1\n")
    assert load_mesh(tmp_path / "neg.obj").faces_fx3.tolist() == [[0, 1, 2]]


def test_mesh_from_arrays_validates_fields() -> None:
    verts = np.zeros((3, 3), np.float32)
    faces = np.array([[0, 1, 2]], np.int64)
    assert mesh_from_arrays(verts, faces, np.zeros((3, 2))).uvs_fx3x2.shape == (1, 3, 2)
    with pytest.raises(MeshError, match=r"positions must have shape \[V, 3\], got \[3, 2\]"):
        mesh_from_arrays(np.zeros((3, 2)), faces)
    with pytest.raises(MeshError, match=r"faces must have shape \[F, 3\] \(triangles\), got \[1, 4\]"):
        mesh_from_arrays(verts, np.array([[0, 1, 2, 0]]))
    with pytest.raises(MeshError, match=r"face 0 has index 7 but the mesh has 3 vertices"):
        mesh_from_arrays(verts, np.array([[0, 1, 7]]))
    with pytest.raises(MeshError, match=r"faces must be integers, got dtype float32"):
        mesh_from_arrays(verts, faces.astype(np.float32))
    with pytest.raises(MeshError, match=r"uvs must have shape"):
        mesh_from_arrays(verts, faces, np.zeros((4, 2)))
    with pytest.raises(MeshError, match=r"positions\[1, 0\] is inf"):
        mesh_from_arrays(np.array([[0, 0, 0], [np.inf, 0, 0], [0, 1, 0]], np.float32), faces)


def test_normalize_to_unit_box_centres_and_scales() -> None:
    mesh = load_mesh(MESHES / "teapot.obj")
    unit_vx3, center, scale = normalize_to_unit_box(mesh.verts_vx3)
    low, high = unit_vx3.min(axis=0), unit_vx3.max(axis=0)
    np.testing.assert_allclose((low + high) / 2, 0.0, atol=1e-6)
    assert abs(float((high - low).max()) - 1.0) < 1e-6
    np.testing.assert_allclose((mesh.verts_vx3 - center) * scale, unit_vx3, atol=1e-6)
    with pytest.raises(ValueError, match="no extent"):
        normalize_to_unit_box(np.ones((4, 3)))

"""GLB and OBJ+MTL export: reloaded by trimesh and by Blender's glTF importer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from backend.export import encode_png, world_to_y_up, write_glb, write_obj
from backend.meshio import load_mesh, normalize_to_unit_box
from backend.texture import unwrap

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"


@pytest.fixture(scope="module")
def textured_spot():
    """Spot in the unit box, unwrapped, with a texture whose left half is red and right half blue."""
    mesh = load_mesh(MESHES / "spot.obj")
    verts_vx3, _, _ = normalize_to_unit_box(mesh.verts_vx3)
    uv_mesh = unwrap(verts_vx3, mesh.faces_fx3, texture_size=128)
    texture = np.zeros((64, 128, 3), np.uint8)
    texture[:, :64] = [255, 0, 0]
    texture[:, 64:] = [0, 0, 255]
    return uv_mesh, texture


def test_encode_png_round_trips() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\|4\], got float64"):
        encode_png(rgb / 255.0)


def test_glb_reloads_in_trimesh_with_texture_and_inverse_conversion(textured_spot, tmp_path: Path) -> None:
    uv_mesh, texture = textured_spot
    data = write_glb(tmp_path / "spot.glb", uv_mesh.verts_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    assert (tmp_path / "spot.glb").read_bytes() == data
    loaded = trimesh.load(tmp_path / "spot.glb", force="mesh", process=False)
    assert len(loaded.vertices) == len(uv_mesh.verts_vx3)
    # The file is Y up: (x, y, z) world -> (x, z, -y).
    np.testing.assert_allclose(loaded.vertices, world_to_y_up(uv_mesh.verts_vx3), atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, uv_mesh.faces_fx3)
    # trimesh undoes glTF's V flip, so its UVs are ours.
    np.testing.assert_allclose(loaded.visual.uv, uv_mesh.uvs_vx2, atol=1e-6)
    image = loaded.visual.material.baseColorTexture
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), texture)


def test_glb_stores_flipped_v_and_y_up_in_the_file(textured_spot) -> None:
    """Read the raw glTF accessors, independently of trimesh's own conversions."""
    uv_mesh, texture = textured_spot
    data = write_glb(None, uv_mesh.verts_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    json_length = int.from_bytes(data[12:16], "little")
    gltf = json.loads(data[20 : 20 + json_length])
    binary = data[20 + json_length + 8 :]
    primitive = gltf["meshes"][0]["primitives"][0]

    def accessor(index: int) -> np.ndarray:
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        width = {"VEC2": 2, "VEC3": 3}[acc["type"]]
        return np.frombuffer(binary, np.float32, acc["count"] * width, start).reshape(-1, width)

    positions = accessor(primitive["attributes"]["POSITION"])
    texcoords = accessor(primitive["attributes"]["TEXCOORD_0"])
    np.testing.assert_allclose(positions[:, 1], uv_mesh.verts_vx3[:, 2], atol=1e-6)  # glTF +Y = our +Z
    np.testing.assert_allclose(positions[:, 2], -uv_mesh.verts_vx3[:, 1], atol=1e-6)
    np.testing.assert_allclose(texcoords[:, 1], 1.0 - uv_mesh.uvs_vx2[:, 1], atol=1e-6)
    material = gltf["materials"][primitive["material"]]
    assert "baseColorTexture" in material["pbrMetallicRoughness"]
    assert gltf["images"][0]["mimeType"] == "image/png"


def test_glb_with_vertex_colors(tmp_path: Path) -> None:
    box = trimesh.creation.box()
    colors = np.random.default_rng(0).random((len(box.vertices), 3))
    write_glb(tmp_path / "box.glb", box.vertices, box.faces, vertex_colors=colors)
    loaded = trimesh.load(tmp_path / "box.glb", force="mesh", process=False)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], np.round(colors * 255).astype(np.uint8))
    # With UVs as well, the textured material wins.
    uvs = np.random.default_rng(1).random((len(box.vertices), 2))
    write_glb(tmp_path / "both.glb", box.vertices, box.faces, uvs=uvs, texture_rgb=np.zeros((2, 2, 3), np.uint8), vertex_colors=colors)
    both = trimesh.load(tmp_path / "both.glb", force="mesh", process=False)
    np.testing.assert_allclose(both.visual.uv, uvs, atol=1e-6)


def test_obj_with_mtl_loads_in_trimesh_and_our_loader(textured_spot, tmp_path: Path) -> None:
    uv_mesh, texture = textured_spot
    written = write_obj(tmp_path / "spot.obj", uv_mesh.verts_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    assert written == [tmp_path / "spot.obj", tmp_path / "spot.mtl", tmp_path / "spot.png"]
    loaded = trimesh.load(tmp_path / "spot.obj", force="mesh", process=False)
    np.testing.assert_array_equal(np.asarray(loaded.visual.material.image.convert("RGB")), texture)
    assert len(loaded.faces) == len(uv_mesh.faces_fx3)
    ours = load_mesh(tmp_path / "spot.obj")
    np.testing.assert_allclose(ours.verts_vx3, uv_mesh.verts_vx3, atol=1e-6)
    np.testing.assert_allclose(ours.uvs_fx3x2, uv_mesh.uvs_vx2[uv_mesh.faces_fx3], atol=1e-6)
    np.testing.assert_array_equal(ours.texture_rgb, texture)


def test_writers_reject_bad_arrays(tmp_path: Path) -> None:
    verts = np.zeros((3, 3), np.float32)
    faces = np.array([[0, 1, 2]], np.int32)
    with pytest.raises(ValueError, match=r"faces index 5 out of range for 3 verts"):
        write_glb(None, verts, np.array([[0, 1, 5]]))
    with pytest.raises(ValueError, match=r"uvs must be per vertex \[V, 2\] = \[3, 2\], got \[1, 3, 2\]"):
        write_glb(None, verts, faces, uvs=np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="texture_rgb needs uvs"):
        write_obj(tmp_path / "a.obj", verts, faces, texture_rgb=np.zeros((4, 4, 3), np.uint8))


BLENDER_SCRIPT = """
import json, sys
import bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=sys.argv[1])
obj = next(o for o in bpy.context.scene.objects if o.type == "MESH")
mesh = obj.data
images = [n.image for m in mesh.materials for n in m.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
positions = [list(obj.matrix_world @ v.co) for v in mesh.vertices]
uv_layer = mesh.uv_layers.active.data
loop_uvs = [[mesh.loops[i].vertex_index, *uv_layer[i].uv] for i in range(len(mesh.loops))]
print("RESULT " + json.dumps({"images": [list(i.size) for i in images], "positions": positions, "loop_uvs": loop_uvs}))
"""


@pytest.mark.slow
def test_blender_imports_glb_with_image_texture_in_our_frame(textured_spot, tmp_path: Path) -> None:
    pytest.importorskip("bpy")
    uv_mesh, texture = textured_spot
    write_glb(tmp_path / "spot.glb", uv_mesh.verts_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    result = subprocess.run(
        [sys.executable, "-c", BLENDER_SCRIPT, str(tmp_path / "spot.glb")],
        capture_output=True, text=True, timeout=240,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-2000:]
    imported = json.loads(lines[-1][len("RESULT "):])
    assert imported["images"] == [[128, 64]]  # Blender reports (width, height)
    # Blender's importer undoes glTF's Y-up and V flip: positions and UVs come back as ours.
    positions = np.asarray(imported["positions"])
    assert positions.shape == uv_mesh.verts_vx3.shape
    np.testing.assert_allclose(np.sort(positions, axis=0), np.sort(uv_mesh.verts_vx3, axis=0), atol=1e-5)
    loop_uvs = np.asarray(imported["loop_uvs"])
    vertex_ids = loop_uvs[:, 0].astype(int)
    np.testing.assert_allclose(loop_uvs[:, 1:], uv_mesh.uvs_vx2[vertex_ids], atol=1e-5)
    np.testing.assert_allclose(positions[vertex_ids], uv_mesh.verts_vx3[vertex_ids], atol=1e-5)

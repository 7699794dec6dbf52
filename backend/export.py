"""GLB and OBJ+MTL writers, and PNG encoding.

Conventions, and how they are converted on write:

- Our world is Z up (PROTOCOL.md section 8); glTF is +Y up (the spec), and OBJ files are written
  Y up too (the habit Blender's OBJ importer and exporter follow by default). A world position
  `(x, y, z)` is written as `(x, z, -y)`: the inverse of `backend.meshio.load_mesh`, and exactly
  what Blender's glTF importer undoes, so an imported object stands as it did in our world.
- Our UVs have (0, 0) at the bottom-left of the texture (as OBJ and Blender). glTF puts (0, 0) at
  the top-left, so glTF files store `(u, 1 - v)`; trimesh's glTF exporter applies that flip.
  OBJ stores our UVs as they are.
- Texture images are uint8 [H, W, 3] with row 0 at the top, as PNG stores them.
- UVs here are per vertex (`uvs_vx2`, one UV per vertex, vertices split along seams, as
  `backend.texture.unwrap` returns them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from backend.meshio import Y_UP_TO_Z_UP_3x3

MATERIAL_NAME = "dreamloom_material"


def encode_png(rgb_hxwx3: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] (or [H, W, 4]) image, row 0 at the top."""
    from PIL import Image

    rgb = np.asarray(rgb_hxwx3)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"image must be uint8 [H, W, 3|4], got {rgb.dtype} {list(rgb.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def world_to_y_up(verts_vx3: np.ndarray) -> np.ndarray:
    """Z-up world positions -> Y-up file positions: (x, y, z) -> (x, z, -y)."""
    return (np.asarray(verts_vx3, dtype=np.float32) @ Y_UP_TO_Z_UP_3x3).astype(np.float32)


def _check_mesh_arrays(
    verts_vx3: np.ndarray,
    faces_fx3: np.ndarray,
    uvs_vx2: np.ndarray | None,
    texture_rgb: np.ndarray | None,
    vertex_colors: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    verts_vx3 = np.asarray(verts_vx3, dtype=np.float32)
    faces_fx3 = np.asarray(faces_fx3)
    if verts_vx3.ndim != 2 or verts_vx3.shape[1] != 3:
        raise ValueError(f"verts must have shape [V, 3], got {list(verts_vx3.shape)}")
    if faces_fx3.ndim != 2 or faces_fx3.shape[1] != 3 or not np.issubdtype(faces_fx3.dtype, np.integer):
        raise ValueError(f"faces must be integers of shape [F, 3], got {faces_fx3.dtype} {list(faces_fx3.shape)}")
    if len(faces_fx3) and (faces_fx3.min() < 0 or faces_fx3.max() >= len(verts_vx3)):
        raise ValueError(f"faces index {int(faces_fx3.max())} out of range for {len(verts_vx3)} verts")
    if uvs_vx2 is not None and np.shape(uvs_vx2) != (len(verts_vx3), 2):
        raise ValueError(f"uvs must be per vertex [V, 2] = [{len(verts_vx3)}, 2], got {list(np.shape(uvs_vx2))}")
    if texture_rgb is not None:
        if uvs_vx2 is None:
            raise ValueError("texture_rgb needs uvs")
        if np.asarray(texture_rgb).dtype != np.uint8 or np.ndim(texture_rgb) != 3 or np.shape(texture_rgb)[2] != 3:
            raise ValueError(f"texture_rgb must be uint8 [H, W, 3], got {list(np.shape(texture_rgb))}")
    if vertex_colors is not None and np.shape(vertex_colors)[0] != len(verts_vx3):
        raise ValueError(f"vertex_colors must have one row per vertex ({len(verts_vx3)}), got {list(np.shape(vertex_colors))}")
    return verts_vx3, faces_fx3.astype(np.int64)


def write_glb(
    path: str | Path | None,
    verts: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
    texture_rgb: np.ndarray | None = None,
    vertex_colors: np.ndarray | None = None,
    metadata: dict | None = None,
) -> bytes:
    """A binary glTF of one mesh; written to `path` too unless it is None. Returns the bytes.

    verts [V, 3] (Z-up world), faces [F, 3] int, uvs [V, 2] (bottom-left origin),
    texture_rgb uint8 [H, W, 3] (becomes the PBR material's base colour texture, a PNG),
    vertex_colors [V, 3|4] float in [0, 1] or uint8 (COLOR_0), written only when there are no
    uvs: a textured material takes precedence (a mesh event may carry both); metadata (JSON
    values) goes into the scene's `extras` (Blender's importer makes them custom properties).
    """
    import trimesh
    from PIL import Image

    verts_vx3, faces_fx3 = _check_mesh_arrays(verts, faces, uvs, texture_rgb, vertex_colors)
    # 1. Geometry in glTF's Y-up frame, with no merging or reordering.
    mesh = trimesh.Trimesh(world_to_y_up(verts_vx3), faces_fx3, process=False)
    # 2. Appearance: a textured PBR material, or vertex colours, or a plain material.
    material = trimesh.visual.material.PBRMaterial(
        name=MATERIAL_NAME,
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=0.9,
        baseColorTexture=None if texture_rgb is None else Image.fromarray(np.asarray(texture_rgb)),
    )
    if uvs is not None:
        # trimesh writes (u, 1 - v) into the file: glTF's top-left origin.
        mesh.visual = trimesh.visual.TextureVisuals(uv=np.asarray(uvs, dtype=np.float64), material=material)
    elif vertex_colors is not None:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_rgba_uint8(vertex_colors))
    # 3. Serialise.
    data = trimesh.Scene(mesh, metadata=dict(metadata or {})).export(file_type="glb")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def _rgba_uint8(colors: np.ndarray) -> np.ndarray:
    colors = np.asarray(colors)
    if colors.dtype != np.uint8:
        colors = np.clip(np.round(colors * 255.0), 0, 255).astype(np.uint8)
    if colors.shape[1] == 3:
        colors = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
    return colors


def write_obj(
    path: str | Path,
    verts: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
    texture_rgb: np.ndarray | None = None,
) -> list[Path]:
    """Write `path` (.obj), plus `<stem>.mtl` and `<stem>.png` beside it when textured.

    verts [V, 3] (Z-up world, written Y up), faces [F, 3] int, uvs [V, 2] (bottom-left origin,
    written as they are), texture_rgb uint8 [H, W, 3]. Returns the paths written.
    """
    path = Path(path)
    verts_vx3, faces_fx3 = _check_mesh_arrays(verts, faces, uvs, texture_rgb, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path]
    lines = ["# Dreamloom mesh (Y up)"]
    # 1. Material library and texture, when textured.
    if texture_rgb is not None:
        mtl_path, png_path = path.with_suffix(".mtl"), path.with_suffix(".png")
        png_path.write_bytes(encode_png(np.asarray(texture_rgb)))
        mtl_path.write_text(
            f"newmtl {MATERIAL_NAME}\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd {png_path.name}\n"
        )
        lines += [f"mtllib {mtl_path.name}", f"usemtl {MATERIAL_NAME}"]
        written += [mtl_path, png_path]
    # 2. Vertices, texture coordinates, faces (1-based).
    lines += [f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in world_to_y_up(verts_vx3)]
    if uvs is not None:
        lines += [f"vt {u:.7g} {v:.7g}" for u, v in np.asarray(uvs, dtype=np.float64)]
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in (faces_fx3 + 1)]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in (faces_fx3 + 1)]
    path.write_text("\n".join(lines) + "\n")
    return written

"""Mesh input with validation: OBJ (own parser) and GLB/glTF (trimesh), normalisation to the unit box.

Conventions (PROTOCOL.md section 8, docs/architecture.md):

- World: right-handed, Z up. OBJ and glTF files are Y up (the glTF spec; the OBJ habit that
  Blender's OBJ importer and exporter follow), so a file position `(x, y, z)` becomes
  `(x, -z, y)` on load. `backend.export` applies the inverse on write.
- Texture coordinates are stored per corner: `uvs_fx3x2[f, k]` is the UV of corner `k` of face
  `f`, with UV (0, 0) at the bottom-left of the texture (OBJ's convention; glTF's flipped V is
  undone by trimesh on load).
- Faces are triangles, counter-clockwise seen from outside, `int32`. A polygon with more than
  three corners is an error unless the caller asks for fan triangulation (`triangulate=True`).
- Degenerate faces and unreferenced vertices are tolerated; missing, empty, non-triangular or
  out-of-range input raises `MeshError`, whose message names the file and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# File (Y up) -> world (Z up): (x, y, z) -> (x, -z, y). Its inverse is its transpose.
Y_UP_TO_Z_UP_3x3 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=np.float32)


class MeshError(ValueError):
    """A mesh file or mesh array that cannot be used; the message names the source and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(self.path).name}: {problem}")


@dataclass
class LoadedMesh:
    """A triangle mesh in the world frame (Z up), as loaded from a file or built from arrays."""

    verts_vx3: np.ndarray
    """Vertex positions, float32 [V, 3]."""
    faces_fx3: np.ndarray
    """Triangles as vertex indices, int32 [F, 3], counter-clockwise seen from outside."""
    uvs_fx3x2: np.ndarray | None = None
    """Per-corner texture coordinates, float32 [F, 3, 2], UV (0, 0) bottom-left; None if untextured."""
    texture_rgb: np.ndarray | None = None
    """The base-colour image, uint8 [H, W, 3], row 0 at the top (as PNG stores it); None if absent."""
    texture_path: Path | None = None
    """Where the base-colour image came from (an OBJ's `map_Kd`), None if absent or embedded."""
    source: str = "<arrays>"
    """The file the mesh was read from, for messages."""


# 1. Public entry points -------------------------------------------------------------------------


def load_mesh(path: str | Path, *, triangulate: bool = False) -> LoadedMesh:
    """Read an OBJ, GLB or glTF file into a validated `LoadedMesh` in the Z-up world frame.

    `triangulate=True` fan-triangulates OBJ polygons instead of rejecting them.
    Raises `MeshError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise MeshError(path, f"file not found ({path})")
    if not path.is_file():
        raise MeshError(path, f"not a regular file ({path})")
    if path.stat().st_size == 0:
        raise MeshError(path, "file is empty")
    suffix = path.suffix.lower()
    if suffix == ".obj":
        mesh = _read_obj(path, triangulate=triangulate)
    elif suffix in (".glb", ".gltf"):
        mesh = _read_gltf(path)
    else:
        raise MeshError(path, f"unsupported file type {suffix!r} (expected .obj, .glb or .gltf)")
    mesh.verts_vx3 = (mesh.verts_vx3 @ Y_UP_TO_Z_UP_3x3.T).astype(np.float32)
    return mesh


def mesh_from_arrays(
    positions: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
    *,
    source: str = "<arrays>",
) -> LoadedMesh:
    """Validate raw arrays (e.g. a refine request's buffers) into a `LoadedMesh`.

    positions: [V, 3] finite floats; faces: [F, 3] integer indices into positions;
    uvs: optional, per vertex [V, 2] or per corner [F, 3, 2], finite.
    Raises `MeshError` naming `source` and the offending field and value.
    """
    positions = np.asarray(positions)
    faces = np.asarray(faces)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise MeshError(source, f"positions must have shape [V, 3], got {list(positions.shape)}")
    if not np.issubdtype(positions.dtype, np.floating):
        raise MeshError(source, f"positions must be floats, got dtype {positions.dtype}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(source, f"faces must have shape [F, 3] (triangles), got {list(faces.shape)}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise MeshError(source, f"faces must be integers, got dtype {faces.dtype}")
    verts_vx3 = positions.astype(np.float32)
    _check_finite(source, "positions", verts_vx3)
    _check_faces(source, faces, len(verts_vx3))
    faces_fx3 = faces.astype(np.int32)
    uvs_fx3x2 = None
    if uvs is not None:
        uvs = np.asarray(uvs, dtype=np.float32)
        if uvs.shape == (len(verts_vx3), 2):
            uvs_fx3x2 = uvs[faces_fx3]
        elif uvs.shape == (len(faces_fx3), 3, 2):
            uvs_fx3x2 = uvs
        else:
            raise MeshError(
                source,
                f"uvs must have shape [V, 2] = [{len(verts_vx3)}, 2] or [F, 3, 2] = "
                f"[{len(faces_fx3)}, 3, 2], got {list(uvs.shape)}",
            )
        _check_finite(source, "uvs", uvs_fx3x2)
    return LoadedMesh(verts_vx3, faces_fx3, uvs_fx3x2, source=source)


def normalize_to_unit_box(verts_vx3: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre the bounding box at the origin and scale its longest side to 1.

    Returns (normalised verts float32 [V, 3], centre [3], scale) with
    `normalised = (verts - centre) * scale`.
    """
    verts_vx3 = np.asarray(verts_vx3, dtype=np.float32)
    if verts_vx3.ndim != 2 or verts_vx3.shape[1] != 3 or len(verts_vx3) == 0:
        raise ValueError(f"verts_vx3 must have shape [V>0, 3], got {list(verts_vx3.shape)}")
    low, high = verts_vx3.min(axis=0), verts_vx3.max(axis=0)
    extent = float((high - low).max())
    if not math.isfinite(extent) or extent <= 0.0:
        raise ValueError(f"verts_vx3 has no extent to normalise (longest side {extent})")
    center = ((low + high) / 2.0).astype(np.float32)
    scale = 1.0 / extent
    return ((verts_vx3 - center) * scale).astype(np.float32), center, scale


# 2. Validation helpers --------------------------------------------------------------------------


def _check_finite(source: str, field: str, values: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        raise MeshError(source, f"{field}{list(index)} is {values[index]} (not finite)")


def _check_faces(source: str, faces_fx3: np.ndarray, num_verts: int) -> None:
    if len(faces_fx3) == 0:
        raise MeshError(source, "the mesh has no faces")
    if num_verts == 0:
        raise MeshError(source, "the mesh has no vertices")
    bad = np.argwhere((faces_fx3 < 0) | (faces_fx3 >= num_verts))
    if len(bad):
        face, corner = (int(i) for i in bad[0])
        raise MeshError(
            source,
            f"face {face} has index {int(faces_fx3[face, corner])} but the mesh has {num_verts} vertices",
        )


# 3. OBJ -----------------------------------------------------------------------------------------


def _obj_index(token: str, count: int, kind: str, path: Path, where: str) -> int:
    """One 1-based (or negative, relative) OBJ index -> 0-based, range-checked."""
    try:
        index = int(token)
    except ValueError:
        raise MeshError(path, f"{where} has {kind} index {token!r}, not an integer") from None
    resolved = index - 1 if index > 0 else count + index
    if index == 0 or not 0 <= resolved < count:
        noun = "vertices" if kind == "vertex" else "texture coordinates"
        label = "index" if kind == "vertex" else "texture coordinate index"
        raise MeshError(path, f"{where} has {label} {index} but the mesh has {count} {noun}")
    return resolved


def _read_obj(path: Path, *, triangulate: bool) -> LoadedMesh:
    positions: list[list[float]] = []
    texcoords: list[list[float]] = []
    faces: list[list[int]] = []
    face_uvs: list[list[int] | None] = []
    material_lib: Path | None = None
    text = path.read_text(encoding="utf-8", errors="replace")
    # Pass 1: vertices and texture coordinates (OBJ allows faces to refer back only, but
    # collecting all first gives one clear out-of-range message with the final count).
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        tag = parts[0]
        if tag == "v":
            positions.append(_obj_floats(parts[1:], 3, 3, "vertex", path, line_no))
        elif tag == "vt":
            texcoords.append(_obj_floats(parts[1:], 2, 1, "texture coordinate", path, line_no))
        elif tag == "mtllib" and len(parts) > 1:
            material_lib = path.parent / " ".join(parts[1:])
    # Pass 2: faces (numbered from 0 in file order for messages).
    face_no = -1
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] != "f":
            continue
        corners = parts[1:]
        face_no += 1
        if len(corners) < 3:
            raise MeshError(path, f"face {face_no} (line {line_no}) has {len(corners)} corners, need 3")
        if len(corners) > 3 and not triangulate:
            raise MeshError(
                path,
                f"face {face_no} (line {line_no}) has {len(corners)} corners; only triangles are "
                "accepted (triangulate the mesh first)",
            )
        vert_ids, uv_ids = [], []
        for corner in corners:
            fields = corner.split("/")
            where = f"face {face_no} (line {line_no})"
            vert_ids.append(_obj_index(fields[0], len(positions), "vertex", path, where))
            if len(fields) > 1 and fields[1]:
                uv_ids.append(_obj_index(fields[1], len(texcoords), "texture coordinate", path, where))
        if uv_ids and len(uv_ids) != len(vert_ids):
            raise MeshError(path, f"face {face_no} (line {line_no}) has texture coordinates on some corners only")
        # Fan triangulation (a no-op for triangles): (0, k, k+1).
        for k in range(1, len(vert_ids) - 1):
            faces.append([vert_ids[0], vert_ids[k], vert_ids[k + 1]])
            face_uvs.append([uv_ids[0], uv_ids[k], uv_ids[k + 1]] if uv_ids else None)
    if not positions:
        raise MeshError(path, "no vertices ('v' lines) in the file")
    if not faces:
        raise MeshError(path, "no faces ('f' lines) in the file")
    verts_vx3 = np.asarray(positions, dtype=np.float32)
    _check_finite(str(path), "vertex", verts_vx3)
    faces_fx3 = np.asarray(faces, dtype=np.int32)
    uvs_fx3x2 = _obj_corner_uvs(path, texcoords, face_uvs)
    texture_path = _obj_texture_path(material_lib) if material_lib is not None else None
    texture_rgb = _read_image(texture_path) if texture_path is not None else None
    return LoadedMesh(verts_vx3, faces_fx3, uvs_fx3x2, texture_rgb, texture_path, source=str(path))


def _obj_floats(tokens: list[str], want: int, minimum: int, kind: str, path: Path, line_no: int) -> list[float]:
    """The first `want` numbers of a `v`/`vt` line (at least `minimum` given; missing ones are 0)."""
    tokens = tokens[:want]
    if len(tokens) < minimum:
        raise MeshError(path, f"line {line_no}: {kind} has {len(tokens)} coordinates, need {minimum}")
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise MeshError(path, f"line {line_no}: {kind} has a non-number in {tokens}") from None
    return values + [0.0] * (want - len(values))


def _obj_corner_uvs(path: Path, texcoords: list[list[float]], face_uvs: list[list[int] | None]) -> np.ndarray | None:
    with_uvs = [i for i, uv in enumerate(face_uvs) if uv is not None]
    if not with_uvs:
        return None
    if len(with_uvs) != len(face_uvs):
        first = next(i for i, uv in enumerate(face_uvs) if uv is None)
        raise MeshError(path, f"triangle {first} has no texture coordinates but other faces do")
    table_tx2 = np.asarray(texcoords, dtype=np.float32)[:, :2]
    return table_tx2[np.asarray(face_uvs, dtype=np.int64)]


def _obj_texture_path(material_lib: Path) -> Path | None:
    """The first `map_Kd` image of the material library, if the library and the image exist."""
    if not material_lib.is_file():
        return None
    for line in material_lib.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "map_Kd":
            image = material_lib.parent / parts[-1]
            return image if image.is_file() else None
    return None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except OSError as error:
        raise MeshError(path, f"cannot read the texture image: {error}") from None


def load_texture(path: str | Path) -> np.ndarray:
    """Read a texture image file as uint8 [H, W, 3], row 0 at the top; `MeshError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MeshError(path, f"texture file not found ({path})")
    return _read_image(path)


# 4. GLB / glTF (trimesh) ------------------------------------------------------------------------


def _read_gltf(path: Path) -> LoadedMesh:
    import trimesh

    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as error:  # trimesh raises many types for corrupt files
        raise MeshError(path, f"cannot parse as glTF: {error}") from None
    geometries = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh)] if len(scene.geometry) else []
    geometries = [g for g in geometries if len(g.faces)]
    if not geometries:
        raise MeshError(path, "no triangle meshes in the file")
    verts, faces, uvs, offset = [], [], [], 0
    texture_rgb = None
    for geometry in geometries:
        faces_fx3 = np.asarray(geometry.faces, dtype=np.int64)
        verts.append(np.asarray(geometry.vertices, dtype=np.float32))
        faces.append(faces_fx3 + offset)
        offset += len(geometry.vertices)
        uv_vx2 = getattr(geometry.visual, "uv", None)
        uvs.append(None if uv_vx2 is None else np.asarray(uv_vx2, dtype=np.float32)[faces_fx3])
        if texture_rgb is None:
            texture_rgb = _trimesh_base_color(geometry)
    verts_vx3 = np.concatenate(verts)
    _check_finite(str(path), "vertex", verts_vx3)
    faces_fx3 = np.concatenate(faces)
    _check_faces(str(path), faces_fx3, len(verts_vx3))
    uvs_fx3x2 = np.concatenate(uvs) if all(u is not None for u in uvs) else None
    return LoadedMesh(verts_vx3, faces_fx3.astype(np.int32), uvs_fx3x2, texture_rgb, None, source=str(path))


def _trimesh_base_color(geometry) -> np.ndarray | None:
    material = getattr(geometry.visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()

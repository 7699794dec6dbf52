"""Meshes from the backend into the scene, and a scene mesh out for Refine texture.

Each generate job owns one object, created in the "Dreamloom" collection and found afterwards by
its `dreamloom_job_id` property wherever the artist moved or renamed it. Every `mesh` event
replaces the object's mesh geometry in place (`clear_geometry`, then the arrays
`core.mesh.prepare_mesh_event` laid out off the main thread go in with `foreach_set`: positions,
`.edge_verts`, `.corner_vert`, `.corner_edge`, face starts, a FLOAT2 corner attribute for the
UVs), so the object's transform, modifiers and material slots stay and Blender has nothing left
to compute. An update that cannot be applied now raises `UpdateWaits`; the caller keeps it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import bpy
import numpy as np

from .core import mesh as core_mesh

COLLECTION_NAME = "Dreamloom"
"""The collection that holds generated objects."""
UV_MAP_NAME = "UVMap"
"""The UV map a generated mesh gets."""
REFINE_UV_MAP_NAME = "Dreamloom UV"
"""The UV map Refine texture adds when the backend made new UVs."""
OBJECT_NAME_CHARS = 48
"""Object names are the prompt cut to this length."""
JOB_ID_PROP = "dreamloom_job_id"
"""Custom property naming the generate job an object (and its mesh) belongs to."""
REFINE_JOB_ID_PROP = "dreamloom_refine_job_id"
"""Custom property naming the refine job an object was sent to."""


class UpdateWaits(Exception):
    """An update cannot be applied now (Edit Mode, a locked object); it is kept and tried again."""


# 1. Objects and geometry --------------------------------------------------------------------------


def dreamloom_collection(scene: bpy.types.Scene) -> bpy.types.Collection:
    """The "Dreamloom" collection, created and linked to the scene when missing."""
    collection = bpy.data.collections.get(COLLECTION_NAME)
    if collection is None:
        collection = bpy.data.collections.new(COLLECTION_NAME)
    if scene.collection.children.get(collection.name) is None:
        scene.collection.children.link(collection)
    return collection


def object_name(prompt: str) -> str:
    """An object name from the prompt (first line, cut short)."""
    text = " ".join(prompt.split()) or "Dreamloom"
    return text[:OBJECT_NAME_CHARS]


def find_object(job_id: str, hint_name: str = "", prop: str = JOB_ID_PROP) -> bpy.types.Object | None:
    """The object whose `prop` is `job_id` (tried first under `hint_name`), whatever its name."""
    hinted = bpy.data.objects.get(hint_name) if hint_name else None
    if hinted is not None and hinted.get(prop) == job_id:
        return hinted
    return next((obj for obj in bpy.data.objects if obj.get(prop) == job_id), None)


def job_object(scene: bpy.types.Scene, job_item) -> bpy.types.Object:
    """The job's object; created (empty mesh, in the Dreamloom collection) the first time."""
    obj = find_object(job_item.job_id, job_item.object_name)
    if obj is not None:
        job_item.object_name = obj.name
        return obj
    name = object_name(job_item.prompt)
    mesh = bpy.data.meshes.new(name)
    mesh[JOB_ID_PROP] = job_item.job_id
    obj = bpy.data.objects.new(name, mesh)
    dreamloom_collection(scene).objects.link(obj)
    obj[JOB_ID_PROP] = job_item.job_id
    obj["dreamloom_seq"] = 0
    obj.location = job_item.place_at
    job_item.object_name = obj.name
    return obj


def detached_copy(obj: bpy.types.Object) -> bpy.types.Object:
    """A frozen copy of a streamed object (its own mesh, no job id) beside it, made active."""
    copy = obj.copy()
    copy.data = obj.data.copy()
    for owner in (copy, copy.data):
        for prop in (JOB_ID_PROP, "dreamloom_seq"):
            if prop in owner:
                del owner[prop]
    copy.name = f"{obj.name} (detached)"
    for collection in obj.users_collection:
        collection.objects.link(copy)
    return copy


def import_result(scene: bpy.types.Scene, job_id: str, prompt: str, glb: bytes) -> bpy.types.Object:
    """A job's final GLB as a new object in the Dreamloom collection, carrying the job's id
    (Blender's own glTF importer reads it)."""
    fd, path = tempfile.mkstemp(suffix=".glb", prefix="dreamloom_")
    with os.fdopen(fd, "wb") as file:
        file.write(glb)
    try:
        before = set(bpy.data.objects)
        bpy.ops.import_scene.gltf(filepath=path)
    finally:
        os.unlink(path)
    meshes = [obj for obj in bpy.data.objects if obj not in before and obj.type == "MESH"]
    if not meshes:
        raise ValueError(f"the result of job {job_id!r} holds no mesh")
    collection = dreamloom_collection(scene)
    for obj in meshes:
        for owner in list(obj.users_collection):
            owner.objects.unlink(obj)
        collection.objects.link(obj)
    obj = meshes[0]
    obj.name = object_name(prompt)
    obj[JOB_ID_PROP] = job_id
    obj.data[JOB_ID_PROP] = job_id
    return obj


def remove_orphan_meshes(job_id: str) -> int:
    """Remove the job's mesh datablocks that no object uses any more (its object was deleted)."""
    orphans = [mesh for mesh in bpy.data.meshes if mesh.get(JOB_ID_PROP) == job_id and mesh.users == 0]
    for mesh in orphans:
        bpy.data.meshes.remove(mesh)
    return len(orphans)


def check_editable(obj: bpy.types.Object) -> None:
    """Raise UpdateWaits when the object's mesh cannot take new geometry now."""
    if obj.mode == "EDIT" or obj.data.is_editmode:
        raise UpdateWaits(f"leave Edit Mode on {obj.name!r} to apply the newest mesh")
    if obj.mode == "SCULPT":  # sculpt mode holds its own copy of the geometry
        raise UpdateWaits(f"leave Sculpt Mode on {obj.name!r} to apply the newest mesh")


def replace_geometry(mesh: bpy.types.Mesh, prepared: core_mesh.BlenderMesh) -> None:
    """Swap the mesh's geometry for `prepared` (materials kept). When the triangles are the ones
    the mesh already has (the texture stage streams one topology), only the positions move;
    otherwise the geometry is rebuilt and its other attributes start over."""
    if has_triangles(mesh, prepared):
        mesh.attributes["position"].data.foreach_set("vector", prepared.verts_vx3.ravel())
    else:
        mesh.clear_geometry()
        mesh.vertices.add(len(prepared.verts_vx3))
        mesh.attributes["position"].data.foreach_set("vector", prepared.verts_vx3.ravel())
        mesh.edges.add(len(prepared.edge_verts_ex2))
        mesh.attributes[".edge_verts"].data.foreach_set("value", prepared.edge_verts_ex2.ravel())
        mesh.loops.add(len(prepared.corner_verts_l))
        mesh.attributes[".corner_vert"].data.foreach_set("value", prepared.corner_verts_l)
        mesh.attributes[".corner_edge"].data.foreach_set("value", prepared.corner_edges_l)
        mesh.polygons.add(prepared.face_count)
        mesh.polygons.foreach_set("loop_start", prepared.loop_starts_f)
    if prepared.loop_uvs_lx2 is not None:
        set_loop_uvs(mesh, UV_MAP_NAME, prepared.loop_uvs_lx2)
    elif mesh.attributes.get(UV_MAP_NAME) is not None:
        mesh.attributes.remove(mesh.attributes[UV_MAP_NAME])
    if prepared.loop_colors_lx4 is not None:
        attribute = mesh.color_attributes.get("Color") or mesh.color_attributes.new("Color", "FLOAT_COLOR", "CORNER")
        attribute.data.foreach_set("color", prepared.loop_colors_lx4.ravel())
    mesh.update()


def has_triangles(mesh: bpy.types.Mesh, prepared: core_mesh.BlenderMesh) -> bool:
    """True when the mesh is exactly the prepared triangles on as many vertices (no shape keys).

    F faces holding 3F corners are all triangles (a face has at least 3), so their starts are
    0, 3, 6...; equal corner vertices then mean equal faces, and the edges already fit them.
    """
    face_count = prepared.face_count
    if (mesh.shape_keys is not None or len(mesh.polygons) != face_count or len(mesh.loops) != 3 * face_count
            or len(mesh.vertices) != len(prepared.verts_vx3) or len(mesh.edges) != len(prepared.edge_verts_ex2)):
        return False
    corner_verts_l = np.empty(3 * face_count, dtype=np.int32)
    mesh.attributes[".corner_vert"].data.foreach_get("value", corner_verts_l)
    return bool(np.array_equal(corner_verts_l, prepared.corner_verts_l))


def set_loop_uvs(mesh: bpy.types.Mesh, name: str, loop_uvs_lx2: np.ndarray) -> None:
    """Write one UV per loop into the UV map `name` (a FLOAT2 corner attribute, created when
    missing) and make it the active and rendered one."""
    attribute = mesh.attributes.get(name)
    if attribute is None or attribute.data_type != "FLOAT2" or attribute.domain != "CORNER":
        attribute = mesh.attributes.new(name, "FLOAT2", "CORNER")
    attribute.data.foreach_set("vector", np.ascontiguousarray(loop_uvs_lx2, dtype=np.float32).ravel())
    layer = mesh.uv_layers[name]
    mesh.uv_layers.active = layer
    layer.active_render = True


# 2. Materials ---------------------------------------------------------------------------------------


def packed_image(name: str, png_bytes: bytes) -> bpy.types.Image:
    """An image datablock holding the PNG, packed into the .blend."""
    fd, path = tempfile.mkstemp(suffix=".png", prefix="dreamloom_")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(png_bytes)
        image = bpy.data.images.load(path, check_existing=False)
        image.name = name
        image.pack()
        image.filepath_raw = f"//{name}.png"
    finally:
        os.unlink(path)
    return image


def textured_material(name: str, image: bpy.types.Image | None, uv_map: str, vertex_colors: bool = False) -> bpy.types.Material:
    """A Principled BSDF material whose base colour is the image (or the "Color" attribute)."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):  # from 5.0 every material has its node tree
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.8
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.location = (-400, 300)
        uv = nodes.new("ShaderNodeUVMap")
        uv.uv_map = uv_map
        uv.location = (-650, 300)
        links.new(uv.outputs["UV"], tex.inputs["Vector"])
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    elif vertex_colors:
        attr = nodes.new("ShaderNodeAttribute")
        attr.attribute_name = "Color"
        attr.location = (-400, 300)
        links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def set_material(obj: bpy.types.Object, material: bpy.types.Material) -> None:
    """Put `material` in the mesh's first slot; drop the previous one when it was a streamed
    Dreamloom material nothing else uses."""
    mesh = obj.data
    old = mesh.materials[0] if len(mesh.materials) else None
    if old is None:
        mesh.materials.append(material)
    else:
        mesh.materials[0] = material
    if old is not None and old != material and old.users == 0 and old.name.startswith("Dreamloom"):
        old_name = old.name
        _remove_material(old)
        if material.name.rsplit(".", 1)[0] == old_name:  # "Name.001" -> "Name" once the old one is gone
            material.name = old_name


def set_refined_material(obj: bpy.types.Object, material: bpy.types.Material, slots: str) -> list[str]:
    """Put the refined material in every slot ("ALL") or the active one ("ACTIVE").

    The materials it replaces stay in the file (a fake user keeps them); returns their names.
    """
    if not obj.material_slots:
        obj.data.materials.append(material)
        return []
    indices = range(len(obj.material_slots)) if slots == "ALL" else [obj.active_material_index]
    replaced = []
    for index in indices:
        old = obj.material_slots[index].material
        if old is not None and old != material:
            old.use_fake_user = True
            replaced.append(old.name)
        obj.material_slots[index].material = material
    return replaced


def _remove_material(material: bpy.types.Material) -> None:
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image] if material.node_tree else []
    bpy.data.materials.remove(material)
    for image in images:
        if image.users == 0:
            bpy.data.images.remove(image)


# 3. Events ------------------------------------------------------------------------------------------


def apply_generate_mesh(scene: bpy.types.Scene, job_item, prepared: core_mesh.BlenderMesh) -> bpy.types.Object:
    """Replace the job object's mesh with the prepared one (UVs; a material when textured)."""
    new = find_object(job_item.job_id, job_item.object_name) is None
    obj = job_object(scene, job_item)
    if new and job_item.target_size > 0 and len(prepared.verts_vx3):
        extent = float((prepared.verts_vx3.max(axis=0) - prepared.verts_vx3.min(axis=0)).max())
        obj.scale = [job_item.target_size / extent if extent > 0 else 1.0] * 3
    check_editable(obj)
    try:
        replace_geometry(obj.data, prepared)
    except RuntimeError as exc:  # the mesh is locked by something else right now
        raise UpdateWaits(f"{obj.name!r} cannot take the new mesh now ({exc})") from exc
    name = f"Dreamloom {object_name(job_item.prompt)}"
    if prepared.texture_png is not None:
        image = packed_image(name, prepared.texture_png)
        set_material(obj, textured_material(name, image, UV_MAP_NAME))
    elif prepared.loop_colors_lx4 is not None and not len(obj.data.materials):
        set_material(obj, textured_material(name, None, UV_MAP_NAME, vertex_colors=True))
    return obj


def apply_refine_result(obj: bpy.types.Object, result: core_mesh.RefineResult, slots: str) -> None:
    """Give `obj` the refined texture: a new material (in every slot, or the active one), and a
    new UV map when the UVs changed.

    The result's triangles are the ones sent (each polygon fanned, in order: `fan_triangles`),
    so each result corner maps to one loop of the object's mesh; geometry is not touched.
    """
    check_editable(obj)
    mesh = obj.data
    tri_loops_l = core_mesh.fan_triangles(mesh_triangle_polygons(mesh), len(mesh.polygons)).reshape(-1)
    if result.face_count != len(tri_loops_l) // 3:
        raise core_mesh.MeshDataError(
            f"refine result has {result.face_count} triangles but object {obj.name!r} has "
            f"{len(tri_loops_l) // 3}: its topology changed while the job ran"
        )
    uv_map = mesh.uv_layers.active.name if mesh.uv_layers.active else REFINE_UV_MAP_NAME
    if result.corner_uvs_lx2 is not None:
        loop_uvs_lx2 = np.zeros((len(mesh.loops), 2), np.float32)
        loop_uvs_lx2[tri_loops_l] = result.corner_uvs_lx2
        current = _active_loop_uvs(mesh)
        if current is None or not np.allclose(current, loop_uvs_lx2, atol=1e-6):
            uv_map = REFINE_UV_MAP_NAME
            set_loop_uvs(mesh, uv_map, loop_uvs_lx2)
    if result.texture_png is not None:
        name = f"Dreamloom {obj.name}"
        set_refined_material(obj, textured_material(name, packed_image(name, result.texture_png), uv_map), slots)
    mesh.update()


def _active_loop_uvs(mesh: bpy.types.Mesh) -> np.ndarray | None:
    """The active UV map's UV per loop, read through the attribute API (far faster than uv_layers)."""
    layer = mesh.uv_layers.active
    if layer is None:
        return None
    uvs = np.empty(2 * len(mesh.loops), np.float32)
    mesh.attributes[layer.name].data.foreach_get("vector", uvs)
    return uvs.reshape(-1, 2)


# 4. Export for Refine texture -----------------------------------------------------------------------


@dataclass
class RefineExport:
    """What Refine texture reads from the scene on the main thread; `split()` does the rest on
    any thread."""

    verts_vx3: np.ndarray
    """float32 [V, 3] positions of the evaluated mesh, object space."""
    corner_verts_l: np.ndarray
    """int32 [L] vertex of each corner."""
    tri_polys_t: np.ndarray
    """int32 [T] polygon of each loop triangle."""
    poly_count: int
    """Number of polygons."""
    loop_uvs_lx2: np.ndarray | None
    """float32 [L, 2] the active UV map per corner, or None."""
    texture_png: bytes | None
    """The PNG feeding the base colour, when there is a UV map and such an image."""

    def split(self) -> core_mesh.SplitMesh:
        """The wire-format mesh: fanned triangles, split by UV."""
        return core_mesh.refine_split(
            self.verts_vx3, self.corner_verts_l, self.tri_polys_t, self.poly_count, self.loop_uvs_lx2
        )


def mesh_triangle_polygons(mesh: bpy.types.Mesh) -> np.ndarray:
    """int32 [T] polygon of each loop triangle (a fast read, unlike the triangles' own loops)."""
    mesh.calc_loop_triangles()
    tri_polys_t = np.empty(len(mesh.loop_triangles), dtype=np.int32)
    mesh.loop_triangle_polygons.foreach_get("value", tri_polys_t)
    return tri_polys_t


def export_for_refine(obj: bpy.types.Object, depsgraph) -> RefineExport:
    """The object's evaluated mesh (object space) and its texture, read with fast attribute
    copies only; splitting by UV is left to `RefineExport.split` on the worker thread.

    Raises ValueError naming the object when it is not a mesh or its modifiers change topology
    (the result could not be mapped back onto its loops).
    """
    if obj is None or obj.type != "MESH":
        raise ValueError(f"selected object {getattr(obj, 'name', None)!r} is not a mesh: select a mesh to refine")
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        if len(mesh.loops) != len(obj.data.loops) or len(mesh.polygons) != len(obj.data.polygons):
            raise ValueError(
                f"object {obj.name!r}: its modifiers change the topology; apply or disable them to refine its texture"
            )
        verts_vx3 = np.empty(3 * len(mesh.vertices), np.float32)
        mesh.attributes["position"].data.foreach_get("vector", verts_vx3)
        corner_verts_l = np.empty(len(mesh.loops), np.int32)
        mesh.attributes[".corner_vert"].data.foreach_get("value", corner_verts_l)
        export = RefineExport(
            verts_vx3=verts_vx3.reshape(-1, 3),
            corner_verts_l=corner_verts_l,
            tri_polys_t=mesh_triangle_polygons(mesh),
            poly_count=len(mesh.polygons),
            loop_uvs_lx2=_active_loop_uvs(mesh),
            texture_png=None,
        )
    finally:
        evaluated.to_mesh_clear()
    if export.loop_uvs_lx2 is not None:
        export.texture_png = material_texture_png(obj)
    return export


def material_texture_png(obj: bpy.types.Object) -> bytes | None:
    """The PNG bytes of the image feeding the first material's base colour, if there is one."""
    material = obj.active_material
    if material is None or material.node_tree is None:
        return None
    bsdf = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None or not bsdf.inputs["Base Color"].is_linked:
        return None
    node = bsdf.inputs["Base Color"].links[0].from_node
    if node.type != "TEX_IMAGE" or node.image is None:
        return None
    return image_png(node.image)


def image_png(image: bpy.types.Image) -> bytes | None:
    """The image as PNG bytes: its packed or saved PNG file as it is, else saved anew as PNG
    (painted, generated, packed JPEG, EXR, WebP...); None when it holds no pixels."""
    if image.packed_file is not None and bytes(image.packed_file.data[:8]) == core_mesh.PNG_SIGNATURE:
        return bytes(image.packed_file.data)
    file = bpy.path.abspath(image.filepath) if image.filepath and image.packed_file is None else ""
    if file and os.path.isfile(file) and not image.is_dirty:
        with open(file, "rb") as handle:
            data = handle.read()
        if data.startswith(core_mesh.PNG_SIGNATURE):
            return data
    if image.type == "RENDER_RESULT":
        return _saved_png(image, lambda path: image.save_render(filepath=path))
    if not image.has_data and not _loads(image):
        return None
    copy = image.copy()
    try:
        return _saved_png(copy, lambda path: _save_copy(copy, path))
    finally:
        bpy.data.images.remove(copy)


def _save_copy(copy: bpy.types.Image, path: str) -> None:
    copy.filepath_raw = path
    copy.file_format = "PNG"
    copy.save()


def _saved_png(image: bpy.types.Image, save) -> bytes:
    """`save(path)` writes the image to a temporary PNG; its bytes."""
    fd, path = tempfile.mkstemp(suffix=".png", prefix="dreamloom_")
    os.close(fd)
    try:
        save(path)
        with open(path, "rb") as file:
            return file.read()
    finally:
        os.unlink(path)


def reference_png(image: bpy.types.Image, max_side: int) -> tuple[bytes | None, str]:
    """Any image datablock as a PNG of at most `max_side` pixels a side, and a note when it
    was downscaled to get there."""
    width, height = image.size[0], image.size[1]
    if image.type == "RENDER_RESULT" or max(width, height) <= max_side:  # a render is sent as rendered
        return image_png(image), ""
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    copy = image.copy()
    try:
        copy.scale(*size)
        png = _saved_png(copy, lambda path: _save_copy(copy, path))
    finally:
        bpy.data.images.remove(copy)
    return png, f"reference image {image.name!r} downscaled from {width}x{height} to {size[0]}x{size[1]} (the backend takes at most {max_side} px a side)"


def _loads(image: bpy.types.Image) -> bool:
    try:
        image.reload() if not image.packed_file else None
        return len(image.pixels) > 0
    except RuntimeError:
        return False

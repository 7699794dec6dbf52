"""Meshes from the backend into the scene, and a scene mesh out for Refine texture.

Each generate job owns one object in the "Dreamloom" collection. Every `mesh` event replaces
the object's mesh geometry in place (`clear_geometry` then `foreach_set`), so the object's
transform, modifiers and material slots stay. Positions arrive in Blender's axes and metres
(PROTOCOL.md section 8); seam-split vertices are welded, UVs go per loop.
"""

from __future__ import annotations

import os
import tempfile

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


def job_object(scene: bpy.types.Scene, job_item) -> bpy.types.Object:
    """The job's object; created (empty mesh, in the Dreamloom collection) the first time."""
    obj = bpy.data.objects.get(job_item.object_name) if job_item.object_name else None
    if obj is not None and obj.get("dreamloom_job_id") == job_item.job_id:
        return obj
    name = object_name(job_item.prompt)
    obj = bpy.data.objects.new(name, bpy.data.meshes.new(name))
    dreamloom_collection(scene).objects.link(obj)
    obj["dreamloom_job_id"] = job_item.job_id
    obj["dreamloom_seq"] = 0
    job_item.object_name = obj.name
    return obj


def replace_geometry(mesh: bpy.types.Mesh, welded: core_mesh.WeldedMesh) -> None:
    """Swap the mesh's geometry for `welded` (materials kept; UVs and attributes start over)."""
    num_faces = len(welded.faces_fx3)
    mesh.clear_geometry()
    mesh.vertices.add(len(welded.verts_vx3))
    mesh.vertices.foreach_set("co", welded.verts_vx3.ravel())
    mesh.loops.add(3 * num_faces)
    mesh.loops.foreach_set("vertex_index", welded.faces_fx3.ravel())
    mesh.polygons.add(num_faces)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * num_faces, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    if welded.loop_uvs_lx2 is not None:
        set_loop_uvs(mesh, UV_MAP_NAME, welded.loop_uvs_lx2)
    if welded.loop_colors_lx3 is not None:
        colors_lx4 = np.concatenate([welded.loop_colors_lx3, np.ones((len(welded.loop_colors_lx3), 1), np.float32)], 1)
        attribute = mesh.color_attributes.new("Color", "FLOAT_COLOR", "CORNER")
        attribute.data.foreach_set("color", colors_lx4.ravel())


def set_loop_uvs(mesh: bpy.types.Mesh, name: str, loop_uvs_lx2: np.ndarray) -> bpy.types.MeshUVLoopLayer:
    """Write one UV per loop into the UV map `name` (created when missing) and make it active."""
    layer = mesh.uv_layers.get(name) or mesh.uv_layers.new(name=name)
    layer.data.foreach_set("uv", np.ascontiguousarray(loop_uvs_lx2, dtype=np.float32).ravel())
    mesh.uv_layers.active = layer
    layer.active_render = True
    return layer


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
    """Put `material` in the mesh's first slot; drop the previous one when nothing else uses it."""
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


def _remove_material(material: bpy.types.Material) -> None:
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image] if material.node_tree else []
    bpy.data.materials.remove(material)
    for image in images:
        if image.users == 0:
            bpy.data.images.remove(image)


# 3. Events ------------------------------------------------------------------------------------------


def mesh_event_arrays(message) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, bytes | None]:
    """positions, faces, uvs, colors and texture PNG of a `mesh` event."""
    buffers = message.buffers
    for name in ("positions", "faces"):
        if name not in buffers:
            raise core_mesh.MeshDataError(f"mesh event seq {message.seq} has no buffer '{name}'")
    texture = buffers.get("texture")
    return (
        np.asarray(buffers["positions"]),
        np.asarray(buffers["faces"]),
        None if buffers.get("uvs") is None else np.asarray(buffers["uvs"]),
        None if buffers.get("colors") is None else np.asarray(buffers["colors"]),
        None if texture is None else bytes(texture),
    )


def apply_generate_mesh(scene: bpy.types.Scene, job_item, message) -> bpy.types.Object:
    """Replace the job object's mesh with the event's (welded, UVs, material when textured)."""
    positions, faces, uvs, colors, texture = mesh_event_arrays(message)
    welded = core_mesh.weld(positions, faces, uvs, None if texture is not None else colors)
    obj = job_object(scene, job_item)
    replace_geometry(obj.data, welded)
    name = f"Dreamloom {object_name(job_item.prompt)}"
    if texture is not None:
        image = packed_image(name, texture)
        set_material(obj, textured_material(name, image, UV_MAP_NAME))
    elif welded.loop_colors_lx3 is not None and not len(obj.data.materials):
        set_material(obj, textured_material(name, None, UV_MAP_NAME, vertex_colors=True))
    obj.data.update()
    return obj


def apply_refine_result(obj: bpy.types.Object, job_item, message) -> None:
    """Give `obj` the refined texture: a new material, and a new UV map when the UVs changed.

    The result's triangles are the ones sent (the evaluated mesh's loop triangles, in order),
    so each result corner maps to one loop of the object's mesh; geometry is not touched.
    """
    positions, faces, uvs, _colors, texture = mesh_event_arrays(message)
    mesh = obj.data
    mesh.calc_loop_triangles()
    tri_loops_tx3 = np.empty(3 * len(mesh.loop_triangles), dtype=np.int32)
    mesh.loop_triangles.foreach_get("loops", tri_loops_tx3)
    tri_loops_tx3 = tri_loops_tx3.reshape(-1, 3)
    if len(faces) != len(tri_loops_tx3):
        raise core_mesh.MeshDataError(
            f"refine result has {len(faces)} triangles but object {obj.name!r} has {len(tri_loops_tx3)}: "
            "its topology changed while the job ran"
        )
    uv_map = mesh.uv_layers.active.name if mesh.uv_layers.active else REFINE_UV_MAP_NAME
    if uvs is not None:
        loop_uvs_lx2 = np.zeros((len(mesh.loops), 2), np.float32)
        loop_uvs_lx2[tri_loops_tx3.ravel()] = np.asarray(uvs, np.float32)[np.asarray(faces).ravel()]
        current = _active_loop_uvs(mesh)
        if current is None or not np.allclose(current, loop_uvs_lx2, atol=1e-6):
            uv_map = REFINE_UV_MAP_NAME
            set_loop_uvs(mesh, uv_map, loop_uvs_lx2)
    if texture is not None:
        name = f"Dreamloom {obj.name}"
        set_material(obj, textured_material(name, packed_image(name, texture), uv_map))
    mesh.update()


def _active_loop_uvs(mesh: bpy.types.Mesh) -> np.ndarray | None:
    layer = mesh.uv_layers.active
    if layer is None:
        return None
    uvs = np.empty(2 * len(mesh.loops), np.float32)
    layer.data.foreach_get("uv", uvs)
    return uvs.reshape(-1, 2)


# 4. Export for Refine texture -----------------------------------------------------------------------


def export_for_refine(obj: bpy.types.Object, depsgraph) -> tuple[core_mesh.SplitMesh, bytes | None]:
    """The object's evaluated mesh, triangulated, object space, split by UV; its texture as PNG.

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
        mesh.calc_loop_triangles()
        verts_vx3 = np.empty(3 * len(mesh.vertices), np.float32)
        mesh.vertices.foreach_get("co", verts_vx3)
        tri_verts = np.empty(3 * len(mesh.loop_triangles), np.int32)
        mesh.loop_triangles.foreach_get("vertices", tri_verts)
        tri_loops = np.empty(3 * len(mesh.loop_triangles), np.int32)
        mesh.loop_triangles.foreach_get("loops", tri_loops)
        loop_uvs = _active_loop_uvs(mesh)
        tri_uvs = None if loop_uvs is None else loop_uvs[tri_loops].reshape(-1, 3, 2)
        split = core_mesh.split_by_uv(verts_vx3.reshape(-1, 3), tri_verts.reshape(-1, 3), tri_uvs)
    finally:
        evaluated.to_mesh_clear()
    texture = material_texture_png(obj) if tri_uvs is not None else None
    return split, texture


def material_texture_png(obj: bpy.types.Object) -> bytes | None:
    """The PNG bytes of the image feeding the first material's base colour, if there is one."""
    material = obj.active_material
    if material is None or material.node_tree is None:
        return None
    bsdf = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None or not bsdf.inputs["Base Color"].is_linked:
        return None
    node = bsdf.inputs["Base Color"].links[0].from_node
    if node.type != "TEX_IMAGE" or node.image is None or not node.image.has_data and not _loads(node.image):
        return None
    copy = node.image.copy()
    fd, path = tempfile.mkstemp(suffix=".png", prefix="dreamloom_")
    os.close(fd)
    try:
        copy.filepath_raw = path
        copy.file_format = "PNG"
        copy.save()
        with open(path, "rb") as file:
            return file.read()
    finally:
        bpy.data.images.remove(copy)
        os.unlink(path)


def _loads(image: bpy.types.Image) -> bool:
    try:
        image.reload() if not image.packed_file else None
        return len(image.pixels) > 0
    except RuntimeError:
        return False

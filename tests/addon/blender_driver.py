"""Scenarios run inside the bpy module, one per process (bpy keeps state per process).

    python -m tests.addon.blender_driver SCENARIO --zip dist/dreamloom-X.zip --address ADDR --out DIR

Installs the extension from the zip into the user resources named by BLENDER_USER_RESOURCES (a
temporary folder the test sets), runs the scenario and prints one line `RESULT {json}` that the
test checks. Nothing here imports the add-on from the source tree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bpy

MODULE = "bl_ext.user_default.dreamloom"


def install(zip_path: Path) -> None:
    """Install and enable the extension from its zip."""
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
    if result != {"FINISHED"} or MODULE not in bpy.context.preferences.addons:
        raise RuntimeError(f"installing {zip_path} gave {result}")


def addon_module():
    return sys.modules[MODULE]


def use_backend(address: str, timeout_s: float = 5.0) -> None:
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_mode = "REMOTE"
    prefs.backend_address = address
    prefs.request_timeout = timeout_s


def job_objects() -> list:
    collection = bpy.data.collections.get("Dreamloom")
    return [] if collection is None else list(collection.objects)


def scene_job(job_index: int = -1):
    return bpy.context.scene.dreamloom.jobs[job_index]


def pump_until(condition, timeout_s: float, on_update=None) -> None:
    """Pump by hand (timers never fire in the bpy module) until condition() holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if addon_module().pump() and on_update is not None:
            on_update()
        if condition():
            return
        time.sleep(0.01)
    raise TimeoutError(f"condition not met within {timeout_s} s; last error: {bpy.context.scene.dreamloom.last_error!r}")


def material_summary(obj) -> dict:
    material = obj.active_material
    if material is None or material.node_tree is None:
        return {"material": None}
    images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
    return {
        "material": material.name,
        "image_packed": bool(images and images[0].packed_file is not None),
        "image_size": list(images[0].size) if images else None,
        "uv_maps": [layer.name for layer in obj.data.uv_layers],
    }


# Scenarios ----------------------------------------------------------------------------------------


def scenario_install(args) -> dict:
    install(args.zip)
    core_protocol = sys.modules[f"{MODULE}.core._protocol"]
    result = {"protocol_package": core_protocol.PROTOCOL_PACKAGE, "ops_after_install": hasattr(bpy.ops.dreamloom, "generate")}
    prefs = bpy.context.preferences.addons[MODULE].preferences
    result["prefs"] = [prefs.backend_mode, prefs.backend_address]
    prefs.client_keys_dir = str(args.save)  # a folder for the key pair
    bpy.ops.dreamloom.make_client_keys()
    result["client_keys"] = sorted(p.name for p in Path(args.save).iterdir())
    bpy.ops.preferences.addon_disable(module=MODULE)
    result["disabled"] = MODULE not in bpy.context.preferences.addons
    result["scene_prop_after_disable"] = hasattr(bpy.types.Scene, "dreamloom")
    result["operator_after_disable"] = "DREAMLOOM_OT_generate" in dir(bpy.types)
    bpy.ops.preferences.addon_enable(module=MODULE)
    result["enabled_again"] = MODULE in bpy.context.preferences.addons
    result["scene_prop_after_enable"] = hasattr(bpy.context.scene, "dreamloom")
    result["panel_registered"] = hasattr(bpy.types, "DREAMLOOM_PT_main")
    bpy.ops.preferences.addon_disable(module=MODULE)
    bpy.ops.preferences.addon_enable(module=MODULE)
    result["enabled_third_time"] = MODULE in bpy.context.preferences.addons
    return result


def scenario_wheels_missing(args) -> dict:
    """The extension on disk with none of its wheels (what a zip built for other Pythons or
    platforms leaves, e.g. one installed under an older Blender and carried over): enabling it
    fails with one line and registers nothing."""
    installed = bpy.ops.extensions.package_install_files(filepath=str(args.zip), repo="user_default",
                                                         enable_on_install=False)
    package = Path(bpy.utils.user_resource("EXTENSIONS", path="user_default")) / "dreamloom"
    for wheel in (package / "wheels").glob("*.whl"):
        wheel.unlink()
    try:
        bpy.ops.preferences.addon_enable(module=MODULE)
        message = None
    except RuntimeError as exc:  # the operator's ERROR report
        message = str(exc)
    return {"installed": installed == {"FINISHED"} and (package / "__init__.py").exists(), "message": message,
            "enabled": MODULE in bpy.context.preferences.addons, "panel_registered": hasattr(bpy.types, "DREAMLOOM_PT_main"),
            "blender": bpy.app.version_string, "python": ".".join(str(n) for n in sys.version_info[:2])}


def use_local_backend(store: Path, backend_python: Path) -> None:
    """LOCAL mode: the add-on starts `backend_python -m backend serve --models tiny --device cpu`
    itself (an environment with torch: this Blender's own may have none)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_mode = "LOCAL"
    prefs.backend_address = f"tcp://127.0.0.1:{port}"
    prefs.backend_python = str(backend_python)
    prefs.backend_project_dir = str(Path(__file__).resolve().parents[2])
    prefs.backend_store_dir = str(store)
    prefs.backend_models = "tiny"
    prefs.backend_device = "cpu"


def connect(args, timeout_s: float = 30.0) -> None:
    """LOCAL mode with the tiny models when --local-store is given, else the server at --address."""
    if args.local_store:
        use_local_backend(args.local_store, args.backend_python)
    else:
        use_backend(args.address, timeout_s=timeout_s)


def stop_local_backend() -> dict:
    """Stop Backend; the local process's exit status and the last lines of its log."""
    runtime = sys.modules[f"{MODULE}.runtime"]
    process = runtime.STATE.local.process
    bpy.ops.dreamloom.stop_backend()
    return {"local_backend_exit": process.poll(), "local_backend_log": runtime.local_backend_log(200)}


def scenario_generate(args) -> dict:
    install(args.zip)
    connect(args)
    settings = bpy.context.scene.dreamloom
    settings.prompt = "panel prompt, overridden"
    settings.texture_size = "256"
    if args.target_faces is not None:
        settings.target_faces = args.target_faces
    bpy.ops.dreamloom.generate(prompt=args.prompt, steps=args.steps, seed=3, quality="draft",
                               image_path=args.image or "")
    states: list[dict] = []
    touched = {"done": False}

    def record() -> None:
        objects = job_objects()
        if not objects:
            return
        obj = objects[0]
        if not touched["done"]:  # the artist moves it and adds a modifier after the first mesh
            obj.location = (1.0, 2.0, 3.0)
            obj.modifiers.new("Bevel", "BEVEL")
            touched["done"] = True
        top_z = max((v.co.z for v in obj.data.vertices), default=0.0)
        states.append({"seq": obj.get("dreamloom_seq"), "verts": len(obj.data.vertices), "top_z": top_z,
                       "object": obj.name, "mesh": obj.data.name, "location": list(obj.location)})

    pump_until(lambda: job_objects() and scene_job().state in ("done", "failed", "cancelled"), args.timeout, record)
    notes = list(runtime_module().STATE.notes)  # what the sync below reports to the artist
    bpy.ops.dreamloom.sync(timeout=5)
    obj = job_objects()[0]
    result = {
        "notes": notes,
        "objects": [o.name for o in job_objects()],
        "states": states,
        "job_state": scene_job().state,
        "job_error": scene_job().error,
        "last_seq": scene_job().last_seq,
        "object_seq": obj.get("dreamloom_seq"),
        "object_job_id": obj.get("dreamloom_job_id"),
        "job_id": scene_job().job_id,
        "location": list(obj.location),
        "modifiers": [m.name for m in obj.modifiers],
        "verts": len(obj.data.vertices),
        "faces": len(obj.data.polygons),
        "preview_size": list(bpy.data.images["Dreamloom Preview"].size) if "Dreamloom Preview" in bpy.data.images else None,
        **material_summary(obj),
    }
    if args.save:
        bpy.ops.wm.save_as_mainfile(filepath=str(args.save))
    if args.local_store:
        result.update(stop_local_backend())
    return result


def vertex_positions(obj) -> list[float]:
    co = [0.0] * (3 * len(obj.data.vertices))
    obj.data.vertices.foreach_get("co", co)
    return co


def base_color_image(obj) -> dict:
    """What feeds the active material's Principled BSDF base colour: an image node and its UV map."""
    material = obj.active_material
    bsdf = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None) if material else None
    if bsdf is None or not bsdf.inputs["Base Color"].is_linked:
        return {"base_color_node": None}
    node = bsdf.inputs["Base Color"].links[0].from_node
    uv_nodes = [link.from_node for link in node.inputs["Vector"].links] if node.type == "TEX_IMAGE" else []
    return {"base_color_node": node.type,
            "base_color_image_packed": bool(node.type == "TEX_IMAGE" and node.image and node.image.packed_file),
            "base_color_uv_map": uv_nodes[0].uv_map if uv_nodes and uv_nodes[0].type == "UVMAP" else None}


def scenario_refine(args) -> dict:
    """Refine texture on the active mesh (an imported OBJ); its geometry before and after, its
    material; with --save, the .blend saved and reopened."""
    install(args.zip)
    connect(args)
    bpy.ops.wm.obj_import(filepath=str(args.mesh))
    obj = bpy.context.selected_objects[0]
    bpy.context.view_layer.objects.active = obj
    before = {"verts": len(obj.data.vertices), "loops": len(obj.data.loops), "uv_maps": [l.name for l in obj.data.uv_layers],
              "material": obj.active_material.name if obj.active_material else None}
    positions_before = vertex_positions(obj)
    bpy.ops.dreamloom.refine_texture(prompt=args.prompt, steps=args.steps)
    bpy.ops.dreamloom.sync(timeout=args.timeout)
    positions_after = vertex_positions(obj)
    result = {"before": before, "after_verts": len(obj.data.vertices), "after_loops": len(obj.data.loops),
              "max_position_change": max((abs(a - b) for a, b in zip(positions_before, positions_after)), default=0.0),
              "job_state": scene_job().state, "job_kind": scene_job().kind, "job_error": scene_job().error,
              "active_uv_map": obj.data.uv_layers.active.name if obj.data.uv_layers.active else None,
              **material_summary(obj), **base_color_image(obj)}
    if args.local_store:
        result.update(stop_local_backend())
    if args.save:
        name = obj.name
        bpy.ops.wm.save_as_mainfile(filepath=str(args.save))
        bpy.ops.wm.open_mainfile(filepath=str(args.save))
        reopened = bpy.data.objects[name]
        result["reopened"] = {"verts": len(reopened.data.vertices), **material_summary(reopened),
                              **base_color_image(reopened)}
    return result


def scenario_cancel(args) -> dict:
    install(args.zip)
    use_backend(args.address)
    bpy.ops.dreamloom.generate(prompt=args.prompt, steps=args.steps)
    pump_until(lambda: len(bpy.context.scene.dreamloom.jobs) and scene_job().state == "running", args.timeout)
    # The backend's job list names the worker running it.
    rows = bpy.context.scene.dreamloom.server_jobs
    bpy.ops.dreamloom.refresh_jobs()
    pump_until(lambda: any(row.state == "running" for row in rows), args.timeout)
    labels = [sys.modules[f"{MODULE}.panels"].server_job_label(row) for row in rows]
    bpy.ops.dreamloom.cancel()
    bpy.ops.dreamloom.sync(timeout=args.timeout)
    return {"job_state": scene_job().state, "last_seq": scene_job().last_seq, "labels": labels}


def scenario_stop_after(args) -> dict:
    """Generate, apply events up to seq >= args.stop_seq, save the .blend and quit mid-job."""
    install(args.zip)
    use_backend(args.address)
    bpy.ops.dreamloom.generate(prompt=args.prompt, steps=args.steps)
    pump_until(lambda: job_objects() and scene_job().last_seq >= args.stop_seq, args.timeout)
    bpy.ops.wm.save_as_mainfile(filepath=str(args.save))
    return {"last_seq": scene_job().last_seq, "job_state": scene_job().state,
            "object_seq": job_objects()[0].get("dreamloom_seq")}


def scenario_reopen(args) -> dict:
    """Open a saved .blend, let the add-on re-attach, and catch up to the job's end."""
    install(args.zip)
    use_backend(args.address)
    bpy.ops.wm.open_mainfile(filepath=str(args.save))
    seq_at_open = scene_job().last_seq
    applied: list[int] = []
    pump_until(lambda: scene_job().state in ("done", "failed", "cancelled"), args.timeout,
               lambda: applied.append(scene_job().last_seq))
    return {"seq_at_open": seq_at_open, "applied": applied, "last_seq": scene_job().last_seq,
            "job_state": scene_job().state, "objects": [o.name for o in job_objects()],
            "object_seq": job_objects()[0].get("dreamloom_seq"), "jobs": len(bpy.context.scene.dreamloom.jobs)}


def scenario_wrong_address(args) -> dict:
    install(args.zip)
    use_backend(args.address, timeout_s=2.0)
    start = time.monotonic()
    bpy.ops.dreamloom.generate(prompt=args.prompt)
    submitted_s = time.monotonic() - start
    try:
        bpy.ops.dreamloom.sync(timeout=30)
        message = None
    except RuntimeError as exc:  # an ERROR report reaches a script as RuntimeError
        message = str(exc)
    return {"submit_s": submitted_s, "fail_s": time.monotonic() - start, "message": message,
            "panel_error": bpy.context.scene.dreamloom.last_error,
            "panel_field": bpy.context.scene.dreamloom.last_error_field}


def scenario_bad_input(args) -> dict:
    install(args.zip)
    use_backend(args.address)
    messages = {}
    for name, kwargs in {"steps": {"steps": "coarse=lots"}, "image_path": {"prompt": "a cow", "image_path": "/no/such.png"},
                         "prompt": {"prompt": ""}}.items():
        try:
            bpy.ops.dreamloom.generate(**kwargs)
            messages[name] = None
        except RuntimeError as exc:
            messages[name] = str(exc)
    bpy.context.preferences.addons[MODULE].preferences.backend_address = "localhost:5555"
    try:
        bpy.ops.dreamloom.generate(prompt="a cow")
        messages["backend_address"] = None
    except RuntimeError as exc:
        messages["backend_address"] = str(exc)
    return messages


def wire_event(record, seq: int, body: dict, buffers: dict):
    """A job event as the session hands it over: built, then encoded and decoded by the wire codec."""
    protocol = sys.modules[f"{MODULE}.core._protocol"]
    session = sys.modules[f"{MODULE}.core.session"]
    message = protocol.Message(type="event", job_id=record.job_id, seq=seq, body=body, buffers=buffers)
    return session.JobEvent(record, protocol.codec.decode(protocol.codec.encode(message)))


def apply_now(runtime, update) -> None:
    """Queue a job event as the session would hand it over, and apply it once it is prepared."""
    runtime.dispatch(update)
    deadline = time.monotonic() + 30
    while runtime.STATE.queue.waiting(update.job.job_id):
        runtime.apply_waiting()
        if time.monotonic() > deadline:
            raise TimeoutError(f"event {update.seq} was not applied: {scene_job().note!r}")
        time.sleep(0.005)


def read_obj(path: Path):
    """Vertices [V,3], triangles [T,3], UVs per corner [T,3,2] of an OBJ with vt (numpy, no bpy)."""
    import numpy as np

    verts, uvs, tri_v, tri_uv = [], [], [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts and parts[0] == "vt":
            uvs.append([float(x) for x in parts[1:3]])
        elif parts and parts[0] == "f":
            corners = [p.split("/") for p in parts[1:]]
            for i in range(1, len(corners) - 1):
                tri = [corners[0], corners[i], corners[i + 1]]
                tri_v.append([int(c[0]) - 1 for c in tri])
                tri_uv.append([uvs[int(c[1]) - 1] for c in tri])
    return np.array(verts, np.float32), np.array(tri_v, np.int64), np.array(tri_uv, np.float32)


def scenario_import_textured(args) -> dict:
    """Feed real mesh events (spot split along its UV seams, its PNG texture) through the wire
    codec into the importer; save and reopen the .blend."""
    import numpy as np

    install(args.zip)
    core_mesh = sys.modules[f"{MODULE}.core.mesh"]
    jobs = sys.modules[f"{MODULE}.core.jobs"]
    session = sys.modules[f"{MODULE}.core.session"]
    runtime = sys.modules[f"{MODULE}.runtime"]
    protocol = sys.modules[f"{MODULE}.core._protocol"]
    verts, tris, tri_uvs = read_obj(args.mesh)
    split = core_mesh.split_by_uv(verts, tris, tri_uvs)
    texture = (args.mesh.parent / "spot_texture.png").read_bytes()
    scene = bpy.context.scene
    item = runtime.add_job_item(scene, "f" * 32, "generate", "a textured cow")
    record = jobs.JobRecord(job_id=item.job_id, kind="generate", prompt=item.prompt)
    results = []
    for seq, (scale, final) in enumerate([(0.5, False), (1.0, True)], start=1):
        buffers = {"positions": split.positions_nx3 * np.float32(scale), "faces": split.faces_mx3,
                   "uvs": split.uvs_nx2}
        if final:
            buffers["texture"] = texture
        message = protocol.Message(type="event", job_id=item.job_id, seq=seq,
                                   body={"event": "mesh", "stage": "texture", "step": seq, "final": final},
                                   buffers=buffers)
        decoded = protocol.codec.decode(protocol.codec.encode(message))
        record.last_seq = seq
        apply_now(runtime, session.JobEvent(record, decoded))
        obj = bpy.data.objects[item.object_name]
        results.append({"object": obj.name, "mesh": obj.data.name, "verts": len(obj.data.vertices),
                        "faces": len(obj.data.polygons), "seq": obj.get("dreamloom_seq"),
                        "top_z": max(v.co.z for v in obj.data.vertices)})
    obj = bpy.data.objects[item.object_name]
    uv_layer = obj.data.uv_layers.active
    loop_uvs = np.empty(2 * len(obj.data.loops), np.float32)
    uv_layer.data.foreach_get("uv", loop_uvs)
    uv_error = float(np.abs(loop_uvs.reshape(-1, 3, 2) - tri_uvs).max())
    name = obj.name
    bpy.ops.wm.save_as_mainfile(filepath=str(args.save))
    bpy.ops.wm.open_mainfile(filepath=str(args.save))
    reopened = bpy.data.objects[name]
    return {"sent_vertices": len(split.positions_nx3), "obj_vertices": len(verts), "results": results,
            "uv_error": uv_error, "collection": [o.name for o in job_objects()],
            **material_summary(reopened)}


# Scenarios of an artist at work (tests/addon/test_artist.py) -------------------------------------


def runtime_module():
    return sys.modules[f"{MODULE}.runtime"]


def objects_of_job(job_id: str) -> list:
    return [obj for obj in bpy.data.objects if obj.get("dreamloom_job_id") == job_id]


def job_finished() -> bool:
    return len(bpy.context.scene.dreamloom.jobs) > 0 and scene_job().state in ("done", "failed", "cancelled")


def server_says_finished(job_id: str) -> bool:
    """The session has received the job's last state (whether or not the scene applied it)."""
    session = runtime_module().STATE.session
    return session is not None and job_id in session.jobs and session.jobs[job_id].finished


def first_mesh(args, prompt: str | None = None) -> tuple:
    """Generate and pump until the job's object holds its first mesh; (job item, object)."""
    bpy.ops.dreamloom.generate(prompt=prompt or args.prompt, steps=args.steps)
    pump_until(lambda: len(bpy.context.scene.dreamloom.jobs) and objects_of_job(scene_job().job_id), args.timeout)
    return scene_job(), objects_of_job(scene_job().job_id)[0]


def pump_for(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        addon_module().pump()
        time.sleep(0.01)


def scenario_backend_restart(args) -> dict:
    """The backend is killed mid-job and restarted on the same store; nobody clicks anything."""
    from tests.backend.child_server import start_server_process

    install(args.zip)
    server = start_server_process(args.save / "store", args.save / "server1.log", "--step-delay", "0.05",
                                  python=args.backend_python)
    use_backend(server.address)
    item, obj = first_mesh(args)
    pump_until(lambda: scene_job().last_seq >= 5, args.timeout)
    server.kill()
    killed_at, seq_at_kill = time.monotonic(), scene_job().last_seq
    pump_until(lambda: "unreachable" in scene_job().note, args.timeout)
    noticed_s, note = time.monotonic() - killed_at, scene_job().note
    restarted = start_server_process(args.save / "store", args.save / "server2.log", "--step-delay", "0.05",
                                     bind=server.address, python=args.backend_python)
    try:
        pump_until(job_finished, args.timeout)
        objects = objects_of_job(item.job_id)
        return {"noticed_s": noticed_s, "note": note, "seq_at_kill": seq_at_kill, "job_state": scene_job().state,
                "last_seq": scene_job().last_seq, "objects": len(objects), "object_seq": objects[0].get("dreamloom_seq"),
                "note_after": scene_job().note, "server_log": restarted.log()[-2000:]}
    finally:
        restarted.kill()


def scenario_edit_mode(args) -> dict:
    """The artist enters Edit Mode on the streamed object while the job runs to its end."""
    install(args.zip)
    use_backend(args.address)
    item, obj = first_mesh(args)
    bpy.context.view_layer.objects.active = obj
    obj.select_set(True)
    bpy.ops.object.mode_set(mode="EDIT")
    seq_at_edit, top_z_at_edit = obj["dreamloom_seq"], max(v.co.z for v in obj.data.vertices)
    pump_until(lambda: server_says_finished(item.job_id), args.timeout)
    pump_for(0.5)
    waiting = {"note": scene_job().note, "object_seq": obj["dreamloom_seq"], "state": scene_job().state,
               "problems": [p.text() for p in runtime_module().STATE.problems],
               "top_z_unchanged": max(v.co.z for v in obj.data.vertices) == top_z_at_edit}
    bpy.ops.object.mode_set(mode="OBJECT")
    pump_until(job_finished, args.timeout)
    received = runtime_module().STATE.session.jobs[item.job_id].last_seq
    return {"seq_at_edit": seq_at_edit, "waiting": waiting, "job_state": scene_job().state,
            "top_z_changed": max(v.co.z for v in obj.data.vertices) != top_z_at_edit,
            "last_seq": scene_job().last_seq, "received_seq": received, "object_seq": obj["dreamloom_seq"],
            "verts": len(obj.data.vertices), "note_after": scene_job().note}


def scenario_rename(args) -> dict:
    """The artist renames the streamed object and moves it to a collection of their own."""
    install(args.zip)
    use_backend(args.address)
    item, obj = first_mesh(args)
    obj.name = "My cow"
    mine = bpy.data.collections.new("Mine")
    bpy.context.scene.collection.children.link(mine)
    mine.objects.link(obj)
    bpy.data.collections["Dreamloom"].objects.unlink(obj)
    pump_until(job_finished, args.timeout)
    objects = objects_of_job(item.job_id)
    return {"objects": [o.name for o in objects], "collections": [c.name for c in objects[0].users_collection],
            "object_seq": objects[0].get("dreamloom_seq"), "last_seq": scene_job().last_seq,
            "dreamloom_collection": [o.name for o in job_objects()], "job_state": scene_job().state}


def scenario_delete(args) -> dict:
    """The artist deletes the streamed object mid-job, then brings the result back."""
    install(args.zip)
    use_backend(args.address)
    item, obj = first_mesh(args)
    job_id = item.job_id
    bpy.data.objects.remove(obj)
    pump_until(job_finished, args.timeout)
    after = {"objects": len(objects_of_job(job_id)), "meshes": [m.name for m in bpy.data.meshes if m.get("dreamloom_job_id") == job_id],
             "orphan_meshes": [m.name for m in bpy.data.meshes if m.users == 0], "detached": scene_job().detached,
             "note": scene_job().note, "job_state": scene_job().state}
    bpy.ops.dreamloom.import_result(job_id=job_id)
    pump_until(lambda: objects_of_job(job_id), args.timeout)
    imported = objects_of_job(job_id)[0]
    return {**after, "imported": imported.name, "imported_faces": len(imported.data.polygons),
            "imported_collection": [c.name for c in imported.users_collection], "detached_after": scene_job().detached}


def scenario_two_jobs(args) -> dict:
    """Two jobs at once: a row each; the queued one names the one ahead; Cancel hits the running one."""
    install(args.zip)
    use_backend(args.address)
    panels = sys.modules[f"{MODULE}.panels"]
    bpy.ops.dreamloom.generate(prompt="first cow", steps="coarse=400")
    bpy.ops.dreamloom.generate(prompt="second cow", steps="coarse=400")
    jobs = bpy.context.scene.dreamloom.jobs
    pump_until(lambda: len(jobs) == 2 and jobs[0].state == "running" and jobs[0].steps and jobs[1].state == "queued",
               args.timeout)
    rows = [{"title": r.title, "status": r.status, "running": r.running, "job_id": r.job_id}
            for r in panels.job_rows(bpy.context.scene.dreamloom)]
    bpy.ops.dreamloom.cancel()
    pump_until(lambda: jobs[0].state == "cancelled", args.timeout)
    second_after_cancel = jobs[1].state
    bpy.ops.dreamloom.cancel(job_id=jobs[1].job_id)
    pump_until(lambda: jobs[1].state == "cancelled", args.timeout)
    return {"rows": rows, "job_ids": [j.job_id for j in jobs], "states": [j.state for j in jobs],
            "second_after_cancel": second_after_cancel}


def refine_event(obj, job_id: str, texture: bytes):
    """The final mesh event a refine job of `obj` sends back: its own triangles and UVs and a
    new texture, through the wire codec."""
    importer = sys.modules[f"{MODULE}.importer"]
    jobs = sys.modules[f"{MODULE}.core.jobs"]
    split = importer.export_for_refine(obj, bpy.context.evaluated_depsgraph_get()).split()
    record = jobs.JobRecord(job_id=job_id, kind="refine_texture", last_seq=1)
    return wire_event(record, 1, {"event": "mesh", "stage": "texture", "step": 1, "final": True},
                      {"positions": split.positions_nx3, "faces": split.faces_mx3, "uvs": split.uvs_nx2,
                       "texture": texture})


def scenario_refine_slots(args) -> dict:
    """Refine on cubes with 3 materials (2 faces each): every slot, or the active one only."""
    install(args.zip)
    runtime = runtime_module()
    texture = (args.mesh.parent / "spot_texture.png").read_bytes()
    result = {}
    for index, slots in enumerate(("ALL", "ACTIVE")):
        bpy.ops.mesh.primitive_cube_add(location=(3 * index, 0, 0))
        cube = bpy.context.active_object
        cube.name = f"cube {slots}"
        for name in ("red", "green", "blue"):
            cube.data.materials.append(bpy.data.materials.new(f"{name} {slots}"))
        cube.data.polygons.foreach_set("material_index", [0, 0, 1, 1, 2, 2])
        cube.active_material_index = 1
        bpy.context.scene.dreamloom.refine_slots = slots
        job_id = f"{index + 1:032x}"
        cube["dreamloom_refine_job_id"] = job_id
        runtime.add_job_item(bpy.context.scene, job_id, "refine_texture", "refined", cube.name)
        apply_now(runtime, refine_event(cube, job_id, texture))
        result[slots] = {"slots": [s.material.name for s in cube.material_slots], "note": scene_job().note,
                         "face_materials": [cube.material_slots[p.material_index].material.name for p in cube.data.polygons]}
    bpy.ops.wm.save_as_mainfile(filepath=str(args.save))
    bpy.ops.wm.open_mainfile(filepath=str(args.save))
    result["materials_after_reopen"] = sorted(m.name for m in bpy.data.materials)
    return result


def scenario_reference_images(args) -> dict:
    """Reference images of every kind go as PNG within the backend's limit; no prompt needed."""
    import numpy as np

    install(args.zip)
    use_backend(args.address)
    operators = sys.modules[f"{MODULE}.operators"]
    params = sys.modules[f"{MODULE}.core._protocol"].params
    settings = bpy.context.scene.dreamloom
    painted = bpy.data.images.new("painted", 64, 48, alpha=True)
    painted.pixels.foreach_set(np.random.default_rng(0).random(64 * 48 * 4).astype(np.float32))
    saved = {}
    for name, file_format, ext in (("exr", "OPEN_EXR", "exr"), ("webp", "WEBP", "webp"), ("jpeg", "JPEG", "jpg")):
        copy = painted.copy()
        copy.filepath_raw = str(args.save / f"reference.{ext}")
        copy.file_format = file_format
        copy.save()
        saved[name] = bpy.data.images.load(copy.filepath_raw)
    packed = bpy.data.images.load(str(saved["jpeg"].filepath))
    packed.pack()
    huge = bpy.data.images.new("huge", 5000, 200)
    kinds = {"painted": painted, "packed_jpeg": packed, "huge_png": huge, **saved}
    result = {}
    for name, image in kinds.items():
        settings.image = image
        png, note = operators.reference_image_png(settings, "")
        params.validate_submit("generate", {}, {"image": png})  # the backend's own rules
        result[name] = {"info": list(params.image_info(png)), "note": note}
    settings.image = None
    png, note = operators.reference_image_png(settings, str(args.save / "reference.webp"))
    result["webp_file"] = {"info": list(params.image_info(png)), "note": note}
    settings.image, settings.prompt = painted, ""
    bpy.ops.dreamloom.generate(steps="coarse=1,geometry=1,texture=1")
    pump_until(job_finished, args.timeout)
    result["image_only_job"] = {"state": scene_job().state, "prompt": scene_job().prompt}
    return result


def scenario_first_run(args) -> dict:
    """LOCAL mode without a Project Folder; LOCAL on a machine without CUDA."""
    install(args.zip)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_mode = "LOCAL"
    prefs.backend_project_dir = ""
    result = {}
    try:
        bpy.ops.dreamloom.generate(prompt="a cow")
    except RuntimeError as exc:
        result["no_project"] = {"message": str(exc), "field": bpy.context.scene.dreamloom.last_error_field}
    use_local_backend(args.local_store, args.backend_python)
    prefs.backend_device = "cuda"
    bpy.ops.dreamloom.generate(prompt="a cow")
    pump_until(lambda: bpy.context.scene.dreamloom.last_error, args.timeout)
    result["no_cuda"] = {"message": bpy.context.scene.dreamloom.last_error,
                         "field": bpy.context.scene.dreamloom.last_error_field}
    return result


def scenario_failed_job(args) -> dict:
    """A job that fails: its failure is told once."""
    install(args.zip)
    use_backend(args.address)
    bpy.ops.dreamloom.generate(prompt="please fail", steps=args.steps)
    try:
        bpy.ops.dreamloom.sync(timeout=args.timeout)
        report = ""
    except RuntimeError as exc:
        report = str(exc)
    return {"job_state": scene_job().state, "error": scene_job().error, "report": report,
            "panel_error": bpy.context.scene.dreamloom.last_error}


def scenario_bad_mesh(args) -> dict:
    """Mesh events with bad data never reach bpy: one line on the job, the last good mesh kept."""
    import numpy as np

    install(args.zip)
    runtime = runtime_module()
    core_mesh = sys.modules[f"{MODULE}.core.mesh"]
    jobs = sys.modules[f"{MODULE}.core.jobs"]
    verts, tris, tri_uvs = read_obj(args.mesh)
    split = core_mesh.split_by_uv(verts, tris, tri_uvs)
    good = {"positions": split.positions_nx3, "faces": split.faces_mx3, "uvs": split.uvs_nx2}
    nan_positions = split.positions_nx3.copy()
    nan_positions[7, 2] = np.nan
    bad = {"faces out of range": {**good, "faces": np.where(split.faces_mx3 == 0, 10**6, split.faces_mx3).astype(np.int32)},
           "NaN position": {**good, "positions": nan_positions},
           "texture not a PNG": {**good, "texture": b"GIF89a" + bytes(64)}}
    item = runtime.add_job_item(bpy.context.scene, "e" * 32, "generate", "a bad cow")
    record = jobs.JobRecord(job_id=item.job_id)
    result = {"notes": {}}
    for seq, (name, buffers) in enumerate([("good", good), *bad.items()], start=1):
        body = {"event": "mesh", "stage": "geometry", "step": seq, "final": False}
        apply_now(runtime, wire_event(record, seq, body, buffers))
        obj = bpy.data.objects[item.object_name]
        result["notes"][name] = scene_job().note
        result.setdefault("verts", []).append(len(obj.data.vertices))
    obj = bpy.data.objects[item.object_name]
    result["mesh_valid"] = not obj.data.copy().validate()  # validate() returns True when it had to fix something
    result["edges"], result["faces"] = len(obj.data.edges), len(obj.data.polygons)
    result["last_seq"], result["object_seq"] = scene_job().last_seq, obj["dreamloom_seq"]
    result["problems"] = [p.text() for p in runtime.STATE.problems]
    return result



def scenario_placement(args) -> dict:
    """Land at the 3D cursor at a chosen size with a random seed; detach a copy; recall settings."""
    install(args.zip)
    use_backend(args.address)
    settings = bpy.context.scene.dreamloom
    bpy.context.scene.cursor.location = (4.0, 5.0, 6.0)
    settings.placement, settings.target_size, settings.random_seed = "CURSOR", 2.0, True
    settings.prompt, settings.seed, settings.quality = "a spot cow", 0, "draft"
    item, obj = first_mesh(args, prompt="a spot cow")
    drawn_seed = settings.seed
    landed = {"location": list(obj.location), "size": max(obj.dimensions)}
    bpy.ops.dreamloom.detach_copy(job_id=item.job_id)
    copy = bpy.data.objects[f"{obj.name} (detached)"]
    copy_top = max(v.co.z for v in copy.data.vertices)
    pump_until(job_finished, args.timeout)
    settings.prompt, settings.seed, settings.quality = "something else", 1, "high"
    bpy.ops.dreamloom.recall_job(job_id=item.job_id)
    return {**landed, "drawn_seed": drawn_seed, "sent_seed": json.loads(scene_job().params_json)["seed"],
            "copy_job_id": copy.get("dreamloom_job_id"), "copy_mesh_shared": copy.data == obj.data,
            "copy_frozen": max(v.co.z for v in copy.data.vertices) == copy_top,
            "original_moved_on": max(v.co.z for v in obj.data.vertices) != copy_top,
            "recalled": [settings.prompt, settings.seed, settings.quality], "job_state": scene_job().state}

SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.addon.blender_driver")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--zip", type=Path, required=True)
    parser.add_argument("--address", default="tcp://127.0.0.1:5555")
    parser.add_argument("--prompt", default="a spot cow")
    parser.add_argument("--steps", default="coarse=2,geometry=2,texture=1")
    parser.add_argument("--image", default="")
    parser.add_argument("--target-faces", type=int)
    parser.add_argument("--mesh", type=Path)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--stop-seq", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--local-store", type=Path, help="LOCAL mode with this job store (tiny models, CPU)")
    parser.add_argument("--backend-python", type=Path, default=Path(sys.executable),
                        help="the interpreter a LOCAL backend runs in (default: this one)")
    args = parser.parse_args(argv)
    result = SCENARIOS[args.scenario](args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

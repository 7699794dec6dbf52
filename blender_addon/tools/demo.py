"""The headless demo behind `python build.py demo` (not part of the extension zip).

1. Renders a sample reference image: the shared `spot` cow from the reference view (front),
   transparent background, so its alpha is the object mask; with `--models oracle` (the default)
   it also exports that cow, as placed, to out/oracle/spot.obj.
2. Installs the extension from the zip into the bpy module (a private user-resources folder).
3. Sets the add-on to LOCAL: a local `python -m backend serve` on the oracle models of that cow
   (`--models oracle:out/oracle/spot.obj,spot_texture.png`: exact denoisers of its renders, so the
   pipeline makes a real cow without any weights), the tiny random models, or the real ones. On
   a GPU the oracle job runs the draft preset; on a CPU the backend forces the small one
   (`serve --preset small`: 32² coarse renders, 600 coarse steps), which takes minutes.
4. Generates from the prompt and image, pumping events (timers never run in the bpy module).
5. Writes out/demo.blend, out/demo.glb and a Cycles render out/demo.png, then stops the backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"
MODULE = "bl_ext.user_default.dreamloom"
DEFAULT_PROMPT = "a black and white cow, standing, photorealistic"
ORACLE_STEPS = "coarse=300,geometry=60,texture=30"
"""Steps of the oracle demo at the draft preset (on a GPU) when no --steps are given."""
CPU_PRESET = "small"
"""The preset the oracle demo's backend forces on a CPU (`serve --preset small`): minutes, not hours."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python build.py demo")
    parser.add_argument("--zip", type=Path, required=True, help="the extension zip (build.py addon)")
    parser.add_argument("--out", type=Path, default=REPO / "out", help="output folder")
    parser.add_argument("--python", default=sys.executable, help="Python of the backend's environment")
    parser.add_argument("--models", choices=("oracle", "tiny", "default"), default="oracle",
                        help="backend models: oracle (of the spot cow; a real result without weights), "
                             "tiny (random) or default (the real models, GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--steps", default="", help='e.g. "coarse=20,geometry=10,texture=10" (default: tiny preset)')
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cuda_available(python: str) -> bool:
    import subprocess

    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def look_at(obj, target=(0.0, 0.0, 0.0)) -> None:
    from mathutils import Vector

    direction = Vector(target) - obj.location
    obj.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()


def add_camera(bpy, name: str, elevation_deg: float, azimuth_deg: float, distance: float, fov_deg: float):
    """A camera placed as PROTOCOL.md section 8 says, looking at the origin."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    camera = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    camera.location = (distance * math.cos(e) * math.sin(a), -distance * math.cos(e) * math.cos(a), distance * math.sin(e))
    camera.data.sensor_fit = "VERTICAL"
    camera.data.angle = math.radians(fov_deg)
    bpy.context.scene.collection.objects.link(camera)
    look_at(camera)
    return camera


def setup_render(bpy, size: int, samples: int, transparent: bool) -> None:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.film_transparent = transparent
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA" if transparent else "RGB"
    world = scene.world or bpy.data.worlds.new("World")
    scene.world = world
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 1.0
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.8, 0.82, 0.85, 1.0)


def render_reference(bpy, path: Path, export_obj: Path | None) -> None:
    """Spot, normalised to the unit box, rendered from the reference view (elevation 0, azimuth 0);
    exported as placed (world space, Y-up OBJ) to `export_obj` when given."""
    bpy.ops.wm.obj_import(filepath=str(SHARED / "meshes" / "spot.obj"))  # Y-up file to Z-up
    spot = bpy.context.selected_objects[0]
    spot.rotation_euler.z += math.pi  # spot's file faces -Z; the scene's objects face -Y
    bpy.context.view_layer.update()
    corners = [spot.matrix_world @ v.co for v in spot.data.vertices]
    low = [min(c[i] for c in corners) for i in range(3)]
    high = [max(c[i] for c in corners) for i in range(3)]
    scale = 1.0 / max(h - l for h, l in zip(high, low))
    spot.scale = [scale * s for s in spot.scale]
    spot.location = [-(h + l) / 2 * scale for h, l in zip(high, low)]
    material = bpy.data.materials.new("spot")
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tex = material.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = bpy.data.images.load(str(SHARED / "meshes" / "spot_texture.png"))
    bsdf = material.node_tree.nodes["Principled BSDF"]
    material.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    spot.data.materials.clear()
    spot.data.materials.append(material)
    camera = add_camera(bpy, "Reference camera", 0.0, 0.0, 3.8, 20.0)
    bpy.context.scene.camera = camera
    setup_render(bpy, 256, 16, transparent=True)
    bpy.context.scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    if export_obj is not None:
        export_obj.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.object.select_all(action="DESELECT")
        spot.select_set(True)
        bpy.ops.wm.obj_export(filepath=str(export_obj), export_selected_objects=True, export_materials=False,
                              export_triangulated_mesh=True, export_uv=True, export_normals=False)
    bpy.data.objects.remove(spot)
    bpy.data.objects.remove(camera)


def render_result(bpy, obj, path: Path) -> None:
    """A three-quarter view of the imported object with a sun, Cycles on the CPU."""
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(45), 0.0, math.radians(30))
    bpy.context.scene.collection.objects.link(sun)
    size = max(obj.dimensions) or 1.0
    camera = add_camera(bpy, "Demo camera", 20.0, 35.0, 3.2 * size, 30.0)
    bpy.context.scene.camera = camera
    setup_render(bpy, 512, 32, transparent=False)
    bpy.context.scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "store", ignore_errors=True)  # a fresh job store: no old job resumes ahead of ours
    os.environ["BLENDER_USER_RESOURCES"] = str(out / "blender_user")  # before bpy starts
    import bpy

    device = args.device or ("cuda" if cuda_available(args.python) else "cpu")
    say = lambda text: print(f"demo: {text}", flush=True)  # noqa: E731

    for obj in list(bpy.data.objects):  # the startup scene's cube, camera and light
        bpy.data.objects.remove(obj)

    # 1. The sample reference image.
    reference = out / "demo_reference.png"
    oracle_obj = out / "oracle" / "spot.obj" if args.models == "oracle" else None
    render_reference(bpy, reference, oracle_obj)
    say(f"rendered the sample reference image {reference} (spot, front view, alpha = mask)")
    models = args.models
    if oracle_obj is not None:
        models = f"oracle:{oracle_obj},{(SHARED / 'meshes' / 'spot_texture.png').resolve()}"

    # 2. The extension, from its zip.
    bpy.ops.extensions.package_install_files(filepath=str(args.zip), repo="user_default", enable_on_install=True)
    addon = sys.modules[MODULE]
    say(f"installed {args.zip.name} as {MODULE}")

    # 3. A local backend the add-on starts itself.
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_mode = "LOCAL"
    prefs.backend_address = f"tcp://127.0.0.1:{free_port()}"
    prefs.backend_python = args.python
    prefs.backend_project_dir = str(REPO)
    prefs.backend_store_dir = str(out / "store")
    prefs.backend_models = "default" if args.models == "oracle" else args.models
    prefs.backend_device = device
    preset = CPU_PRESET if args.models == "oracle" and device == "cpu" else ""
    say(f"starting the backend (--models {models} --device {device}{' --preset ' + preset if preset else ''}) "
        f"at {prefs.backend_address}")
    if args.models == "oracle":  # the preference offers default and tiny: start it with the oracle spec
        runtime = sys.modules[f"{MODULE}.runtime"]
        runtime.STATE.local = runtime.LocalBackend(
            dataclasses.replace(prefs.local_backend(), models=models, preset=preset), out / "backend.log")
        runtime.STATE.local.start()

    # 4. Generate and follow the job.
    try:
        settings = bpy.context.scene.dreamloom
        settings.prompt = args.prompt
        settings.image_path = str(reference)
        settings.texture_size = "512"
        steps = args.steps
        if args.models == "oracle":
            settings.quality = "draft"
            steps = steps or ("" if preset else ORACLE_STEPS)  # a forced preset brings its own steps
        bpy.ops.dreamloom.generate(steps=steps)
        deadline = time.monotonic() + args.timeout
        last = ""
        while time.monotonic() < deadline:
            if not addon.pump():
                time.sleep(0.05)
            if settings.last_error:
                say(f"error: {settings.last_error}")
                return 1
            job = settings.jobs[-1] if len(settings.jobs) else None
            if job is not None:
                line = f"{job.state} {job.stage} {job.step}/{job.steps} (seq {job.last_seq})"
                if line != last:
                    say(line)
                    last = line
                if job.state in ("done", "failed", "cancelled"):
                    break
        job = settings.jobs[-1]
        if job.state != "done":
            say(f"the job ended {job.state}: {job.error or settings.last_error}")
            return 1
        # 5. Save, export, render.
        obj = bpy.data.objects[job.object_name]
        bpy.ops.wm.save_as_mainfile(filepath=str(out / "demo.blend"))
        bpy.ops.object.select_all(action="DESELECT")
        obj.select_set(True)
        bpy.ops.export_scene.gltf(filepath=str(out / "demo.glb"), use_selection=True, export_format="GLB")
        render_result(bpy, obj, out / "demo.png")
        say(f"imported '{obj.name}': {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} faces, "
            f"material {obj.active_material.name if obj.active_material else None}")
        say(f"wrote {out / 'demo.blend'}, {out / 'demo.glb'} and the render {out / 'demo.png'}")
        if args.models == "oracle":
            say("the oracle models know the spot mesh (they are exact denoisers of its renders): the "
                "cow shows the pipeline works; real prompts need `--models default` and the weights")
        if args.models == "tiny":
            say("the tiny models are random: they exercise every step but give no meaningful shape; "
                "run `python build.py demo --models default` on a GPU box with the weights for a real one")
    finally:
        bpy.ops.dreamloom.stop_backend()
        addon.pump()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Operators: each parses its input, validates it, acts, then reports.

Scripting entry points (they work in background Blender and the bpy module):
`bpy.ops.dreamloom.generate(prompt=..., image_path=..., quality=..., seed=..., steps="coarse=N,...")`,
`bpy.ops.dreamloom.refine_texture(prompt=...)`, `bpy.ops.dreamloom.cancel()`,
`bpy.ops.dreamloom.import_result(job_id=...)`,
`bpy.ops.dreamloom.sync(timeout=SECONDS)`. An error is reported as ERROR, which a script sees as a
RuntimeError carrying the message and the field.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import bpy
from bpy.props import EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy.types import Operator

from . import importer, preferences, runtime
from .properties import QUALITY_ITEMS
from .core import _protocol
from .core import settings as core_settings
from .core.mesh import MeshDataError
from .core.session import SessionError

SYNC_SLEEP_S = 0.02
"""How long `sync` sleeps between pumps when nothing arrived."""

USER_ERRORS = (core_settings.SettingsError, SessionError, _protocol.ProtocolError, MeshDataError, OSError, ValueError)
"""Exceptions an operator turns into an ERROR report (anything else is a bug and propagates)."""


def error_text(exc: Exception) -> str:
    """The message of a user error, naming its field."""
    field = getattr(exc, "field", None)
    message = getattr(exc, "message", None) or str(exc)
    if field and field not in message:
        return f"{message} (field {field})"
    return message


def fail(operator: Operator, exc: Exception) -> set[str]:
    """Show the error in the panel and report it; the operator is cancelled."""
    problem = runtime.Problem(error_text(exc), getattr(exc, "field", "") or "")
    runtime.record_problem(problem)
    operator.report({"ERROR"}, problem.text())
    return {"CANCELLED"}


def clear_error(scene: bpy.types.Scene) -> None:
    """Forget the panel's last error (a new action starts)."""
    scene.dreamloom.last_error = ""
    scene.dreamloom.last_error_field = ""


def reference_image_png(settings, image_path: str) -> tuple[bytes | None, str]:
    """The reference image as PNG (operator path, else the panel's datablock, else its file)
    within the backend's size limit, and a note when it had to be converted or downscaled."""
    path = image_path or ("" if settings.image else settings.image_path)
    if path:
        file = Path(bpy.path.abspath(path))
        if not file.is_file():
            raise core_settings.SettingsError("image_path", f"image_path {path!r} is not a file")
        data = file.read_bytes()
        try:  # a PNG or JPEG within the limits goes as it is
            _protocol.params.validate_submit("generate", {}, {"image": data})
            return data, ""
        except _protocol.ProtocolError:
            pass
        try:
            image = bpy.data.images.load(str(file), check_existing=True)
        except RuntimeError as exc:
            raise core_settings.SettingsError("image_path", f"image_path {path!r} is not an image Blender can read: {exc}") from exc
    else:
        image = settings.image
    if image is None:
        return None, ""
    png, note = importer.reference_png(image, _protocol.params.MAX_IMAGE_SIDE)
    if png is None:
        raise core_settings.SettingsError("image", f"reference image {image.name!r} holds no pixels to send")
    return png, note


def placement(context: bpy.types.Context) -> tuple[float, float, float]:
    """Where the panel's Place At puts a new result: origin, 3D cursor, or the active object."""
    mode = context.scene.dreamloom.placement
    if mode == "CURSOR":
        return tuple(context.scene.cursor.location)
    if mode == "SELECTION" and context.active_object is not None:
        return tuple(context.active_object.matrix_world.translation)
    return (0.0, 0.0, 0.0)


def ensure_timer() -> None:
    """Start the polling timer (it does nothing without an open session)."""
    if not bpy.app.timers.is_registered(runtime.timer):
        bpy.app.timers.register(runtime.timer, first_interval=0.1, persistent=True)


class DREAMLOOM_OT_generate(Operator):
    """Send the prompt and reference image to the backend and stream the result into the scene"""

    bl_idname = "dreamloom.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    prompt: StringProperty(name="Prompt", description="Overrides the panel's prompt", options={"SKIP_SAVE"})
    image_path: StringProperty(
        name="Image", subtype="FILE_PATH", description="Overrides the panel's reference image", options={"SKIP_SAVE"}
    )
    quality: EnumProperty(
        name="Quality",
        items=[("PANEL", "Panel", "Use the panel's quality"), *QUALITY_ITEMS],
        default="PANEL",
        options={"SKIP_SAVE"},
    )
    seed: IntProperty(name="Seed", default=-1, min=-1, max=2**31 - 1, description="-1: the panel's seed", options={"SKIP_SAVE"})
    steps: StringProperty(
        name="Steps", description='e.g. "coarse=20,geometry=10,texture=10"; empty: the panel\'s', options={"SKIP_SAVE"}
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        clear_error(scene)
        try:
            # 1. Parse: panel values, then this call's overrides.
            job = scene.dreamloom.to_job_settings()
            job.prompt = self.prompt or job.prompt
            job.quality = job.quality if self.quality == "PANEL" else self.quality
            job.seed = job.seed if self.seed < 0 else self.seed
            if scene.dreamloom.random_seed and self.seed < 0:
                job.seed = scene.dreamloom.seed = random.randint(0, 2**31 - 1)
            if self.steps:
                job.steps = core_settings.parse_steps(self.steps)
            # 2. Validate with the protocol's own rules.
            image, note = reference_image_png(scene.dreamloom, self.image_path)
            params = core_settings.generate_params(job, has_image=image is not None)
            buffers = {"image": image} if image is not None else {}
            _protocol.params.validate_submit("generate", params, buffers)
            # 3. Act.
            runtime.session().submit("generate", params, buffers, context={
                "scene": scene.name, "params": params, "place_at": placement(context),
                "target_size": scene.dreamloom.target_size})
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        if note:
            self.report({"INFO"}, f"Dreamloom: {note}")
        what = params["prompt"][:40] or "the reference image"
        self.report({"INFO"}, f"Dreamloom: sent '{what}' to {preferences.get().backend_address}")
        return {"FINISHED"}


class DREAMLOOM_OT_refine_texture(Operator):
    """Send the active mesh (as evaluated, triangulated) to refine its texture; geometry stays"""

    bl_idname = "dreamloom.refine_texture"
    bl_label = "Refine Texture"
    bl_options = {"REGISTER"}

    prompt: StringProperty(name="Prompt", description="Overrides the panel's prompt", options={"SKIP_SAVE"})
    steps: StringProperty(name="Steps", description='e.g. "texture=20"; empty: the panel\'s', options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        clear_error(scene)
        obj = context.active_object
        try:
            # 1. Parse.
            job = scene.dreamloom.to_job_settings()
            job.prompt = self.prompt or job.prompt
            job.steps = core_settings.parse_steps(self.steps) if self.steps else {
                k: v for k, v in job.steps.items() if k == "texture"}
            # 2. Validate the params; read the mesh (its split by UV and the buffers' checks run
            # on the worker thread, and the job is sent once they are done).
            image, note = reference_image_png(scene.dreamloom, "")
            params = core_settings.refine_params(job, has_image=image is not None)
            export = importer.export_for_refine(obj, context.evaluated_depsgraph_get())
            # 3. Act.
            runtime.submit_prepared(
                "refine_texture", params, lambda: refine_buffers(export, image),
                context={"scene": scene.name, "object_name": obj.name},
            )
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        if note:
            self.report({"INFO"}, f"Dreamloom: {note}")
        self.report({"INFO"}, f"Dreamloom: sending {obj.name!r} ({len(export.tri_polys_t)} triangles) to refine its texture")
        return {"FINISHED"}


def refine_buffers(export: importer.RefineExport, image: bytes | None) -> dict:
    """The `refine_texture` buffers (on the worker thread): the mesh split by UV, its texture,
    the reference image."""
    split = export.split()
    buffers = {"positions": split.positions_nx3, "faces": split.faces_mx3}
    if split.uvs_nx2 is not None:
        buffers["uvs"] = split.uvs_nx2
    if export.texture_png is not None:
        buffers["texture"] = export.texture_png
    if image is not None:
        buffers["image"] = image
    return buffers


def active_job(scene: bpy.types.Scene, job_id: str):
    """The job item named by `job_id`, else the running one, else the newest queued one."""
    jobs = scene.dreamloom.jobs
    if job_id:
        item = scene.dreamloom.job(job_id)
        if item is None:
            raise ValueError(f"job_id {job_id!r} is not a job of this scene")
        return item
    unfinished = [item for item in jobs if item.state not in runtime.FINISHED_STATES]
    running = [item for item in unfinished if item.state == "running"]
    if running or unfinished:
        return (running or unfinished)[-1]
    raise ValueError("there is no running job to cancel")


class DREAMLOOM_OT_cancel(Operator):
    """Cancel a running job (the newest one by default)"""

    bl_idname = "dreamloom.cancel"
    bl_label = "Cancel"

    job_id: StringProperty(name="Job ID", description="Empty: the newest unfinished job", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            item = active_job(context.scene, self.job_id)
            runtime.session().cancel(item.job_id)
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        self.report({"INFO"}, f"Dreamloom: cancelling '{item.prompt[:40]}'")
        return {"FINISHED"}


class DREAMLOOM_OT_sync(Operator):
    """Apply backend events until the running jobs end or the time is up (for scripts: timers do
    not run in background Blender or the bpy module)"""

    bl_idname = "dreamloom.sync"
    bl_label = "Sync"

    timeout: FloatProperty(name="Timeout", default=60.0, min=0.0, description="Seconds to wait at most")

    def execute(self, context: bpy.types.Context) -> set[str]:
        deadline = time.monotonic() + self.timeout
        # 1. Pump until nothing is under way, or the time is up.
        while True:
            handled = runtime.pump()
            if not runtime.busy() or time.monotonic() >= deadline:
                break
            if not handled:
                time.sleep(SYNC_SLEEP_S)
        # 2. Report.
        for note in runtime.take_notes():
            self.report({"INFO"}, f"Dreamloom: {note}")
        problems = runtime.take_problems()
        if problems:
            self.report({"ERROR"}, "; ".join(p.text() for p in problems))
            return {"CANCELLED"}
        if runtime.busy():
            self.report({"WARNING"}, f"Dreamloom: still running after {self.timeout:g} s")
        return {"FINISHED"}


class DREAMLOOM_OT_refresh_jobs(Operator):
    """Ask the backend for its job list"""

    bl_idname = "dreamloom.refresh_jobs"
    bl_label = "Refresh Jobs"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            runtime.session().list_jobs()
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        return {"FINISHED"}


class DREAMLOOM_OT_attach_job(Operator):
    """Follow a backend job in this scene (catching up on its events)"""

    bl_idname = "dreamloom.attach_job"
    bl_label = "Attach"

    job_id: StringProperty(name="Job ID")

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        row = next((r for r in scene.dreamloom.server_jobs if r.job_id == self.job_id), None)
        try:
            if not self.job_id:
                raise ValueError("job_id is empty: pick a job from the backend's list")
            item = scene.dreamloom.job(self.job_id)
            if item is None:
                kind = row.kind if row else "generate"
                if kind == "refine_texture":
                    raise ValueError(f"job_id {self.job_id!r} refines a texture: attach it from the file that sent it")
                item = runtime.add_job_item(scene, self.job_id, kind, row.prompt if row else self.job_id)
            runtime.session().follow(item.job_id, item.last_seq, item.kind, item.prompt)
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        return {"FINISHED"}


class DREAMLOOM_OT_delete_job(Operator):
    """Delete a job on the backend (cancelled first if it runs); the scene's object stays"""

    bl_idname = "dreamloom.delete_job"
    bl_label = "Delete"

    job_id: StringProperty(name="Job ID")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            if not self.job_id:
                raise ValueError("job_id is empty: pick a job from the backend's list")
            runtime.session().delete_job(self.job_id)
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        return {"FINISHED"}


class DREAMLOOM_OT_import_result(Operator):
    """Bring a done job's final mesh (its GLB) into the scene as a new object"""

    bl_idname = "dreamloom.import_result"
    bl_label = "Import Result"

    job_id: StringProperty(name="Job ID", description="Empty: the newest done job of this scene")

    def execute(self, context: bpy.types.Context) -> set[str]:
        scene = context.scene
        try:
            job_id = self.job_id or next(
                (j.job_id for j in reversed(scene.dreamloom.jobs) if j.state == "done" and j.kind == "generate"), "")
            if not job_id:
                raise ValueError("job_id is empty and this scene has no done generate job")
            runtime.session().get_result(job_id, context={"import": True, "scene": scene.name})
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        return {"FINISHED"}


class DREAMLOOM_OT_detach_copy(Operator):
    """Freeze a copy of a job's object for editing while the job streams on into the original"""

    bl_idname = "dreamloom.detach_copy"
    bl_label = "Detach Copy"

    job_id: StringProperty(name="Job ID", description="Empty: the job of the active object")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            job_id = self.job_id or (context.active_object.get(importer.JOB_ID_PROP, "") if context.active_object else "")
            obj = importer.find_object(job_id) if job_id else None
            if obj is None:
                raise ValueError(f"job_id {job_id!r} has no object in the scene: select a streamed object")
            copy = importer.detached_copy(obj)
        except USER_ERRORS as exc:
            return fail(self, exc)
        self.report({"INFO"}, f"Dreamloom: {copy.name!r} is a frozen copy of {obj.name!r}")
        return {"FINISHED"}


class DREAMLOOM_OT_recall_job(Operator):
    """Put a past job's settings back into the panel"""

    bl_idname = "dreamloom.recall_job"
    bl_label = "Recall Settings"

    job_id: StringProperty(name="Job ID")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            item = context.scene.dreamloom.job(self.job_id)
            if item is None or not item.params_json:
                raise ValueError(f"job_id {self.job_id!r} has no recorded settings in this scene")
            context.scene.dreamloom.recall(json.loads(item.params_json))
        except USER_ERRORS as exc:
            return fail(self, exc)
        return {"FINISHED"}


class DREAMLOOM_OT_test_connection(Operator):
    """Connect to the backend anew; its device and models show below once it answers"""

    bl_idname = "dreamloom.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        runtime.close_session()
        try:
            runtime.session()
        except USER_ERRORS as exc:
            return fail(self, exc)
        ensure_timer()
        self.report({"INFO"}, f"Dreamloom: saying hello to {preferences.get().backend_address}")
        return {"FINISHED"}


class DREAMLOOM_OT_make_client_keys(Operator):
    """Make a CurveZMQ key pair for this client in the Client Keys folder"""

    bl_idname = "dreamloom.make_client_keys"
    bl_label = "Make Client Keys"

    def execute(self, context: bpy.types.Context) -> set[str]:
        prefs = preferences.get()
        try:
            if not prefs.client_keys_dir:
                raise core_settings.SettingsError("client_keys_dir", "client_keys_dir is empty: choose a folder first")
            folder = Path(bpy.path.abspath(prefs.client_keys_dir))
            public_key_file, _secret = _protocol.keys.create_client_keys(folder)
        except USER_ERRORS as exc:
            return fail(self, exc)
        self.report({"INFO"}, f"Dreamloom: client keys in {folder}; give {public_key_file} to the server's admin")
        return {"FINISHED"}


class DREAMLOOM_OT_start_backend(Operator):
    """Start the local backend (preferences: Python, project folder, models)"""

    bl_idname = "dreamloom.start_backend"
    bl_label = "Start Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            backend = runtime.start_local_backend()
        except USER_ERRORS as exc:
            return fail(self, exc)
        self.report({"INFO"}, f"Dreamloom: backend started (pid {backend.process.pid}), log {backend.log_path}")
        return {"FINISHED"}


class DREAMLOOM_OT_stop_backend(Operator):
    """Stop the local backend and free the GPU"""

    bl_idname = "dreamloom.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        stopped = runtime.stop_local_backend()
        self.report({"INFO"}, "Dreamloom: backend stopped" if stopped else "Dreamloom: no local backend was running")
        return {"FINISHED"}


CLASSES = (
    DREAMLOOM_OT_generate,
    DREAMLOOM_OT_refine_texture,
    DREAMLOOM_OT_cancel,
    DREAMLOOM_OT_sync,
    DREAMLOOM_OT_refresh_jobs,
    DREAMLOOM_OT_attach_job,
    DREAMLOOM_OT_delete_job,
    DREAMLOOM_OT_import_result,
    DREAMLOOM_OT_detach_copy,
    DREAMLOOM_OT_recall_job,
    DREAMLOOM_OT_test_connection,
    DREAMLOOM_OT_make_client_keys,
    DREAMLOOM_OT_start_backend,
    DREAMLOOM_OT_stop_backend,
)

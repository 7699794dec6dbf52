"""The sidebar panel: 3D viewport, tab "Dreamloom"."""

from __future__ import annotations

from dataclasses import dataclass

import bpy
from bpy.types import Panel

from . import runtime

FINISHED = ("done", "failed", "cancelled")


@dataclass
class JobRow:
    """What the panel shows for one unfinished job."""

    job_id: str
    """The job."""
    title: str
    """Prompt and state."""
    status: str
    """Stage and step, or what it waits for."""
    factor: float
    """Progress in the stage, 0 to 1."""
    note: str
    """Why an update waits, or that the backend is unreachable ("" when all is well)."""
    running: bool
    """True for the job the backend runs now (it gets the preview)."""


def job_rows(settings) -> list[JobRow]:
    """One row per unfinished job of the scene, oldest first; a queued job names the one ahead."""
    active = [job for job in settings.jobs if job.state not in FINISHED]
    running = [job for job in active if job.state == "running"]
    ahead = running[0].prompt if running else next(
        (row.prompt for row in settings.server_jobs if row.state == "running"), "")
    rows = []
    for job in active:
        what = job.prompt[:40] or job.job_id[:8]
        if job.state == "queued":
            behind = f"behind '{ahead[:30]}'" if ahead else f"position {job.position}"
            status, factor = f"queued {behind}", 0.0
        else:
            status = f"{job.stage or 'waiting'} {job.step}/{job.steps}{eta_text(job.eta_s)}"
            factor = job.step / job.steps if job.steps else 0.0
        rows.append(JobRow(job.job_id, f"{what} ({job.state})", status, factor, job.note, job.state == "running"))
    return rows


def server_job_label(row) -> str:
    """A row of the backend's job list: prompt, state, and while it runs its stage, step and
    the worker running it (a studio's backend has several)."""
    label = f"{row.prompt[:28] or row.job_id[:8]}: {row.state}"
    if row.state == "running" and row.steps:
        label += f" {row.stage} {row.step}/{row.steps}"
    if row.state == "running" and row.worker:
        label += f" on {row.worker}"
    return label


def eta_text(seconds: float) -> str:
    """"1 min 05 s left" style text (empty when unknown)."""
    if seconds < 0:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f", {minutes} min {secs:02d} s left" if minutes else f", {secs} s left"


class DREAMLOOM_PT_main(Panel):
    """Prompt, reference, camera, quality; Generate; progress; preview; jobs; Refine texture."""

    bl_label = "Dreamloom"
    bl_idname = "DREAMLOOM_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Dreamloom"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.dreamloom
        # 1. What to make.
        col = layout.column(align=True)
        col.prop(settings, "prompt", text="", icon="TEXT", placeholder="Prompt")
        col.prop(settings, "negative_prompt", text="", icon="CANCEL", placeholder="Negative prompt")
        layout.template_ID(settings, "image", open="image.open")
        layout.prop(settings, "image_path", text="Image File")
        # 2. Cameras (folded).
        layout.prop(settings, "show_camera", icon="TRIA_DOWN" if settings.show_camera else "TRIA_RIGHT", emboss=False)
        if settings.show_camera:
            box = layout.box()
            for name in ("elevation_range", "azimuth_range", "distance_range", "fov_range"):
                box.row(align=True).prop(settings, name)
            box.label(text="Reference view")
            grid = box.grid_flow(columns=2, align=True)
            for name in ("reference_elevation", "reference_azimuth", "reference_distance", "reference_fov"):
                grid.prop(settings, name)
        # 3. Quality and Generate.
        row = layout.row(align=True)
        row.prop(settings, "quality", text="")
        row.prop(settings, "texture_size", text="")
        row.prop(settings, "target_faces")
        row = layout.row(align=True)
        row.prop(settings, "seed")
        row.prop(settings, "random_seed", text="Random", icon="FILE_REFRESH")
        row.prop(settings, "steps", text="", placeholder="steps: coarse=N,...")
        row = layout.row(align=True)
        row.prop(settings, "placement", text="")
        row.prop(settings, "target_size")
        layout.operator("dreamloom.generate", icon="PLAY")
        # 4. The running job.
        self.draw_progress(layout, settings)
        # 5. Errors.
        if settings.last_error:
            box = layout.box()
            box.alert = True
            box.label(text=settings.last_error[:200], icon="ERROR")
            if settings.last_error_field:
                box.label(text=f"Field: {settings.last_error_field}")
        # 6. Refine texture of the selected mesh.
        row = layout.row()
        row.enabled = context.active_object is not None and context.active_object.type == "MESH"
        row.operator("dreamloom.refine_texture", icon="TEXTURE")
        layout.prop(settings, "refine_slots", text="Slots")

    def draw_progress(self, layout: bpy.types.UILayout, settings) -> None:
        for row in job_rows(settings):
            box = layout.box()
            box.label(text=row.title, icon="TIME")
            box.progress(factor=row.factor, type="BAR", text=row.status)
            if row.note:
                box.label(text=row.note[:200], icon="INFO")
            preview = bpy.data.images.get(runtime.PREVIEW_IMAGE_NAME) if row.running else None
            if preview is not None:
                preview.preview_ensure()
                box.template_icon(icon_value=preview.preview.icon_id, scale=8.0)
            buttons = box.row(align=True)
            buttons.operator("dreamloom.cancel", icon="CANCEL").job_id = row.job_id
            buttons.operator("dreamloom.detach_copy", icon="DUPLICATE").job_id = row.job_id


class DREAMLOOM_PT_jobs(Panel):
    """The backend's jobs: re-attach or delete."""

    bl_label = "Backend Jobs"
    bl_idname = "DREAMLOOM_PT_jobs"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Dreamloom"
    bl_parent_id = "DREAMLOOM_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.dreamloom
        for job in settings.jobs:
            row = layout.row(align=True)
            row.label(text=f"{job.prompt[:28] or job.job_id[:8]}: {job.state}", icon="OUTLINER_OB_MESH")
            row.operator("dreamloom.recall_job", text="", icon="RECOVER_LAST").job_id = job.job_id
        layout.operator("dreamloom.refresh_jobs", icon="FILE_REFRESH")
        followed = {j.job_id for j in settings.jobs}
        for row_data in settings.server_jobs:
            row = layout.row(align=True)
            row.label(text=server_job_label(row_data), icon="CHECKMARK" if row_data.job_id in followed else "DOT")
            row.operator("dreamloom.attach_job", text="", icon="LINKED").job_id = row_data.job_id
            if row_data.state == "done" and row_data.kind == "generate":
                row.operator("dreamloom.import_result", text="", icon="IMPORT").job_id = row_data.job_id
            row.operator("dreamloom.delete_job", text="", icon="TRASH").job_id = row_data.job_id


CLASSES = (DREAMLOOM_PT_main, DREAMLOOM_PT_jobs)

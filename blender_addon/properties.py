"""Scene properties: the panel's settings and the jobs this .blend follows.

The jobs live in the .blend (`scene.dreamloom.jobs`) with the last applied `seq`, so reopening
the file re-attaches to them and catches up without duplicates.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    FloatVectorProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)
from bpy.types import PropertyGroup

from .core import settings as core_settings

QUALITY_ITEMS = [
    ("draft", "Draft", "Fewest steps: a quick look"),
    ("standard", "Standard", "The default number of steps"),
    ("high", "High", "More steps for a finer result"),
]
TEXTURE_SIZE_ITEMS = [(str(s), f"{s} px", f"Texture of {s} x {s} pixels") for s in core_settings.TEXTURE_SIZES]


class DreamloomJobItem(PropertyGroup):
    """One job this scene follows (saved in the .blend)."""

    job_id: StringProperty(name="Job ID", description="The backend's id of the job")
    kind: StringProperty(name="Kind", default="generate", description="generate or refine_texture")
    prompt: StringProperty(name="Prompt", description="The job's prompt")
    state: StringProperty(name="State", default="queued", description="queued, running, done, failed or cancelled")
    stage: StringProperty(name="Stage", description="coarse, geometry or texture")
    step: IntProperty(name="Step", description="Current step in the stage")
    steps: IntProperty(name="Steps", description="Steps in the current stage")
    eta_s: FloatProperty(name="Time Left", default=-1.0, description="Seconds left in the stage (-1: unknown)")
    last_seq: IntProperty(name="Last Seq", description="The seq of the last event applied to the scene")
    object_name: StringProperty(name="Object", description="The object this job writes into")
    error: StringProperty(name="Error", description="The server's message when the job failed")
    note: StringProperty(name="Note", description="Why an update waits, or that the backend is unreachable")
    position: IntProperty(name="Queue Position", description="Jobs ahead of this one while it is queued")
    detached: BoolProperty(
        name="Detached", description="The job's object was deleted: its meshes no longer go into the scene"
    )
    place_at: FloatVectorProperty(name="Place At", size=3, subtype="TRANSLATION", description="Where the object lands")
    target_size: FloatProperty(name="Size", default=0.0, description="Longest side of the first mesh (0: as generated)")
    params_json: StringProperty(name="Settings", description="The params the job was sent with (JSON), to recall them")


class DreamloomServerJob(PropertyGroup):
    """One row of the backend's job list (refreshed on request, not meaningful after a reload)."""

    job_id: StringProperty(name="Job ID")
    kind: StringProperty(name="Kind")
    state: StringProperty(name="State")
    prompt: StringProperty(name="Prompt")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step")
    steps: IntProperty(name="Steps")
    last_seq: IntProperty(name="Last Seq")
    worker: StringProperty(name="Worker", description="The backend worker running it (node/GPU), while it runs")


class DreamloomSettings(PropertyGroup):
    """The sidebar panel's settings, per scene."""

    prompt: StringProperty(name="Prompt", description="What to make (1 to 1,000 characters)")
    negative_prompt: StringProperty(name="Negative Prompt", description="What to avoid")
    image: PointerProperty(
        name="Reference Image", type=bpy.types.Image, description="Reference image datablock (wins over the file)"
    )
    image_path: StringProperty(
        name="Reference File", subtype="FILE_PATH", description="Reference image file (PNG or JPEG); alpha is the mask"
    )
    elevation_range: FloatVectorProperty(
        name="Elevation", size=2, default=(-10.0, 45.0), min=-89.0, max=89.0, description="Min and max camera elevation (degrees)"
    )
    azimuth_range: FloatVectorProperty(
        name="Azimuth", size=2, default=(-180.0, 180.0), min=-180.0, max=180.0, description="Min and max camera azimuth (degrees)"
    )
    distance_range: FloatVectorProperty(
        name="Distance", size=2, default=(3.8, 3.8), min=0.01, max=100.0, description="Min and max camera distance (metres)"
    )
    fov_range: FloatVectorProperty(
        name="Field of View", size=2, default=(20.0, 20.0), min=1.0, max=120.0, description="Min and max field of view (degrees)"
    )
    reference_elevation: FloatProperty(name="Elevation", default=0.0, min=-89.0, max=89.0, description="Reference view elevation")
    reference_azimuth: FloatProperty(name="Azimuth", default=0.0, min=-180.0, max=180.0, description="Reference view azimuth")
    reference_distance: FloatProperty(name="Distance", default=3.8, min=0.01, max=100.0, description="Reference view distance")
    reference_fov: FloatProperty(name="Field of View", default=20.0, min=1.0, max=120.0, description="Reference view field of view")
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default="standard", description="Steps per stage")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1, description="Random seed")
    random_seed: BoolProperty(
        name="Random Seed", default=False, description="Draw a new seed for every job (the drawn one shows in Seed)"
    )
    texture_size: EnumProperty(name="Texture Size", items=TEXTURE_SIZE_ITEMS, default="1024", description="Texture edge")
    target_faces: IntProperty(
        name="Faces", default=50_000, min=0, soft_max=500_000, step=1000,
        description="Face budget of the generated mesh (0 keeps every face; under 500 is raised to 500)",
    )
    steps: StringProperty(
        name="Steps", description='Per-stage overrides, e.g. "coarse=500,geometry=200,texture=200" (empty: by quality)'
    )
    refine_slots: EnumProperty(
        name="Refine Slots",
        items=[
            ("ALL", "All Slots", "The refined material goes into every material slot (the old materials stay in the file)"),
            ("ACTIVE", "Active Slot", "Only the active material slot gets the refined material"),
        ],
        default="ALL",
        description="Which material slots Refine Texture replaces",
    )
    placement: EnumProperty(
        name="Place At",
        items=[
            ("ORIGIN", "Origin", "The result lands at the world origin"),
            ("CURSOR", "3D Cursor", "The result lands at the 3D cursor"),
            ("SELECTION", "Selection", "The result takes the active object's place"),
        ],
        default="ORIGIN",
        description="Where a generated object lands",
    )
    target_size: FloatProperty(
        name="Size", default=0.0, min=0.0, max=1000.0, unit="LENGTH",
        description="Scale the object so its first mesh is this long along its longest side (0: as generated)",
    )
    show_camera: BoolProperty(name="Camera", default=False, description="Show the camera ranges")
    jobs: CollectionProperty(type=DreamloomJobItem, name="Jobs")
    active_job_index: IntProperty(name="Active Job", default=-1)
    server_jobs: CollectionProperty(type=DreamloomServerJob, name="Backend Jobs")
    server_job_index: IntProperty(name="Backend Job", default=0)
    last_error: StringProperty(name="Last Error", description="The newest error from the backend or the add-on")
    last_error_field: StringProperty(name="Field", description="The field the newest error names")

    def job(self, job_id: str) -> DreamloomJobItem | None:
        """The job item with this id, or None."""
        for item in self.jobs:
            if item.job_id == job_id:
                return item
        return None

    def recall(self, params: dict) -> None:
        """Put a past job's params back into the panel."""
        self.prompt, self.negative_prompt = params.get("prompt", ""), params.get("negative_prompt", "")
        self.quality, self.seed = params.get("quality", "standard"), int(params.get("seed", 0))
        self.texture_size = str(params.get("texture_size", 1024))
        self.steps = ",".join(f"{stage}={count}" for stage, count in (params.get("steps") or {}).items())
        camera = params.get("camera") or {}
        for name in ("elevation", "azimuth", "distance", "fov"):
            key = "distance" if name == "distance" else f"{name}_deg"
            if key in camera:
                setattr(self, f"{name}_range", camera[key])
            if key in (camera.get("reference") or {}):
                setattr(self, f"reference_{name}", camera["reference"][key])

    def to_job_settings(self) -> core_settings.JobSettings:
        """The panel's values as the core's typed settings (steps parsed)."""
        camera = core_settings.CameraSettings(
            elevation_deg=tuple(self.elevation_range),
            azimuth_deg=tuple(self.azimuth_range),
            distance=tuple(self.distance_range),
            fov_deg=tuple(self.fov_range),
            reference_elevation_deg=self.reference_elevation,
            reference_azimuth_deg=self.reference_azimuth,
            reference_distance=self.reference_distance,
            reference_fov_deg=self.reference_fov,
        )
        return core_settings.JobSettings(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            camera=camera,
            quality=self.quality,
            seed=self.seed,
            texture_size=int(self.texture_size),
            target_faces=self.target_faces,
            steps=core_settings.parse_steps(self.steps),
        )


CLASSES = (DreamloomJobItem, DreamloomServerJob, DreamloomSettings)
"""Registered in this order (property groups before the ones that point at them)."""


def attach() -> None:
    """Add `Scene.dreamloom` (after CLASSES are registered)."""
    bpy.types.Scene.dreamloom = PointerProperty(type=DreamloomSettings)


def detach() -> None:
    """Remove `Scene.dreamloom` (before CLASSES are unregistered)."""
    del bpy.types.Scene.dreamloom

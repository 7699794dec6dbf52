"""The generation pipeline: prompt (+ reference image) -> textured mesh, in three stages.

    1. coarse    a NeuS field, volume rendered, optimised with hybrid SDS (2D prior with
                 view-dependent prompts + Zero123 3D-SDS on the render over white when an image
                 is given), the reference-view losses, eikonal, sparsity and opaque; views
                 widen and timesteps anneal over the stage's first steps.
    2. geometry  `DMTet.from_sdf(neus, padding=0.1)`, rasterised renders coloured by NeuS's colour
                 field: the 2D prior sees normals (colours every `rgb_every` steps), Zero123 the
                 colours; the reference RGB, mask and depth losses; normal consistency.
    3. texture   the surface fixed (floaters dropped, then decimated to the face budget), xatlas
                 UVs, a `ColorField` sharpened by BSD (+ the reference RGB loss), then baked into
                 the UV texture.

`refine_texture` jobs run only stage 3 on the mesh they bring. Each stage is one plain loop over
steps; a job streams `stage` and `mesh` events and `progress` through its context (the server's
`backend.jobs.JobContext`, or the CLI's `LocalContext`), checkpoints at every stage start and
every `checkpoint_every` steps, and resumes from its newest checkpoint after a restart.
See docs/pipeline.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from backend.config import STAGES, PipelineConfig, config_for_job, text_only_fov_deg
from backend.jobs import JobFailed
from backend.mesh_clean import drop_floaters
from backend.stages import checkpoint as ckpt
from backend.stages.stream import Cadence, emit_mesh, preview_png


# 1. The runner the server and the CLI share ------------------------------------------------------


@dataclass
class PipelineRunner:
    """Runs jobs through the pipeline; guidance models are loaded once, at construction."""

    guidance: Any
    """`backend.guidance.models.GuidanceModels`, loaded once per server."""
    torch_device: torch.device
    """Where the fields, renders and guidance run."""
    preset: str | None
    """A preset forced on every job (`serve --preset`; "tiny" with the tiny models), else None: the
    job's quality."""
    device: str = ""
    """For `welcome`: e.g. "cpu" or "cuda:0 NVIDIA H100 80GB HBM3"."""
    models: dict[str, str] = field(default_factory=dict)
    """Role -> model name, for `welcome`."""

    def run(self, ctx: Any) -> None:
        """Run one job (`ctx` is a `backend.jobs.JobContext` or the CLI's `LocalContext`)."""
        config = config_for_job(ctx.params, self.preset)
        Job(ctx, config, self.guidance, self.torch_device).run()


def describe_device(device: torch.device) -> str:
    """"cpu", or "cuda:0 <GPU name>"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return str(device)


def make_runner(models: str, device: str, preset: str | None = None) -> PipelineRunner:
    """The runner `python -m backend serve` and the CLI use: guidance models `models`
    ("default", "tiny" or a folder) loaded on `device` ("cpu", "cuda", "cuda:1"); `preset` forces
    every job onto that preset (`serve --preset`; the tiny models force "tiny")."""
    from backend.config import PRESETS
    from backend.guidance.models import load_models

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    guidance = load_models(models, torch_device)
    return PipelineRunner(
        guidance=guidance,
        torch_device=torch_device,
        preset=preset or ("tiny" if models == "tiny" else None),
        device=describe_device(torch_device),
        models=guidance.names(),
    )


# 2. One job ---------------------------------------------------------------------------------------


@dataclass
class Surface:
    """The fixed surface of the texture stage, split along UV seams (one UV per vertex)."""

    verts_vx3: Tensor
    """Positions in the normalised scene frame, float32 [V, 3]: what is rendered."""
    faces_fx3: Tensor
    """Triangles, int32 [F, 3]."""
    uvs_vx2: Tensor
    """One UV per vertex, float32 [V, 2], (0, 0) at the bottom-left."""
    out_verts_vx3: Tensor
    """The same vertices in the output's coordinates (a refined mesh keeps the input's)."""

    def tensors(self) -> dict[str, Tensor]:
        """The fields by name, for a checkpoint."""
        return {
            "verts_vx3": self.verts_vx3,
            "faces_fx3": self.faces_fx3,
            "uvs_vx2": self.uvs_vx2,
            "out_verts_vx3": self.out_verts_vx3,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], device: torch.device) -> "Surface":
        """The surface a checkpoint holds, on `device`."""
        return cls(**{name: tensors[name].to(device) for name in (
            "verts_vx3", "faces_fx3", "uvs_vx2", "out_verts_vx3")})


def job_key(kind: str, config: PipelineConfig, prompt: str) -> str:
    """A digest tying a checkpoint to its job's kind, config and prompt."""
    text = json.dumps([kind, repr(config), prompt])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Job:
    """One run of the pipeline for one job context. `run()` is the whole story."""

    def __init__(self, ctx: Any, config: PipelineConfig, guidance: Any, device: torch.device):
        from backend.raster import get_rasterizer

        self.ctx = ctx
        self.config = config
        self.guidance = guidance
        self.device = device
        # Cameras and backgrounds draw on the CPU (the same views on every device); ray jitter
        # and the guidance's timesteps and noise draw on the device they are used on.
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.device_generator = self.generator
        if device.type != "cpu":
            self.device_generator = torch.Generator(device).manual_seed(config.seed + 1)
        self.rasterizer = get_rasterizer(device)
        self.key = job_key(ctx.kind, config, ctx.params.prompt)
        self.stage = "coarse"
        self.step = 0
        self.reference_source = None
        self._prepared_references: dict[int, Any] = {}
        self._z123_reference = None

    # The story ------------------------------------------------------------------------------------

    def run(self) -> None:
        from backend.stages.inputs import input_mesh

        torch.manual_seed(self.config.seed)
        # 1. Inputs: the reference image (image jobs), the mesh (refine jobs), the prompt.
        refine = self.ctx.kind == "refine_texture"
        self.mesh_in = input_mesh(self.ctx.inputs) if refine else None
        if not refine and self.config.coarse.steps == 0:
            raise JobFailed(
                "steps.coarse = 0 leaves nothing to shape the object; only refine jobs skip it"
            )
        self.reference_source = self._mask_reference()
        # 2. Where to start: the newest checkpoint of this job, or the beginning.
        resume = self._load_checkpoint(first_stage="texture" if refine else "coarse")
        first = STAGES.index(resume.stage) if resume else (2 if refine else 0)
        # 3. The stages in order, each handing a typed object to the next.
        neus = surface = None
        try:
            if first <= 0:
                neus = self.coarse_stage(resume if first == 0 else None)
            if first <= 1 and not refine:
                verts_vx3, faces_fx3, neus = self.geometry_stage(neus, resume if first == 1 else None)
                verts_vx3, faces_fx3 = drop_floaters(verts_vx3, faces_fx3)
                surface = self.surface_from_mesh(verts_vx3, faces_fx3)
            color, surface = self.texture_stage(
                neus, surface, resume if first == 2 else None
            )
            # 4. The result: bake, hand over the GLB, stream the final textured mesh.
            self.finish(color, surface)
        except torch.cuda.OutOfMemoryError as exc:
            raise JobFailed(self._oom_reason()) from exc
        finally:
            if self.device.type == "cuda":  # leave the GPU clean for the next job
                torch.cuda.empty_cache()

    # Stage 1: coarse NeuS ------------------------------------------------------------------------

    def coarse_stage(self, resume: ckpt.Checkpoint | None):
        from backend.cameras import sample_cameras
        from backend.neus import OccupancyGrid, cos_anneal, render_neus
        from backend.stages.losses import (opaque_loss, over_white, reference_terms,
                                           sparsity_loss, view_axis_depth)

        cfg = self.config.coarse
        self.stage = "coarse"
        neus = self._new_neus()
        optimiser = torch.optim.Adam(self._neus_groups(neus, cfg.lr), betas=(0.9, 0.99), eps=1e-15)
        start = self._restore(resume, {"neus": neus}, {"coarse": optimiser})
        occupancy = None
        if cfg.occupancy_res > 0:
            occupancy = OccupancyGrid(cfg.occupancy_res, device=self.device,
                                      update_every=cfg.occupancy_every)
            if resume is not None and "occupancy_g3" in resume.tensors:
                occupancy.occupied_g3 = resume.tensors["occupancy_g3"].to(self.device)
        hybrid = self._hybrid_guidance(max(1, round(cfg.anneal_fraction * cfg.steps)),
                                       cfg.t_start, cfg.t_end)
        reference = self._reference(cfg.render_res)
        ranges = self._camera_ranges()
        cadence = self._cadence(cfg.steps)
        self._stage_start("coarse", cfg.steps, start, {"neus": neus}, {"coarse": optimiser},
                          occupancy_state(occupancy))
        widened = self._text_only_fov()
        if widened is not None and start == 0:
            low, high = self.config.camera.fov_deg
            self.ctx.emit("note", {"stage": "coarse", "text": (
                f"text-only job: the training views' field of view widened from {low:g}–{high:g}° "
                f"to {widened[0]:.1f}–{widened[1]:.1f}° so the whole scene is in frame")})
        timer = StepTimer(cfg.steps - start)
        for step in range(start, cfg.steps):
            self.step = step
            # 1. Stop here if the job was cancelled.
            self.ctx.check_cancelled()
            # 2. Random views, widening from the reference view to the full ranges.
            cams = sample_cameras(ranges, cfg.batch, cfg.render_res, cfg.render_res,
                                  self._widen(step), self.generator, self.device)
            # 3. Volume-render the field (a random background keeps it from painting the sky).
            optimiser.zero_grad(set_to_none=True)
            neus.update_step(step)
            if occupancy is not None:
                occupancy.update(neus, step)
            anneal = cos_anneal(step, cfg.steps)
            background = torch.rand(3, generator=self.generator).to(self.device)
            out = render_neus(neus, cams, background, cfg.num_samples, cos_anneal_ratio=anneal,
                              occupancy=occupancy, stratified=True, generator=self.device_generator)
            # 4. Hybrid SDS at annealed timesteps: the 2D prior sees the random background,
            #    Zero123 (with an image) the same render over white, as it was trained.
            losses = {}
            sds, info = hybrid.loss(out["rgb"], cams, step, self.device_generator,
                                    rgb_3d_bxhxwx3=over_white(out["rgb"], out["opacity"], background))
            losses["hybrid_sds"] = (1.0, sds)
            # 5. Regularisers: eikonal on the SDF gradient, sparsity and opaque on the opacity.
            losses["eikonal"] = (cfg.eikonal_weight, out["eikonal"])
            losses["sparsity"] = (cfg.sparsity_weight, sparsity_loss(out["opacity"]))
            losses["opaque"] = (cfg.opaque_weight, opaque_loss(out["opacity"]))
            # 6. Backward now, so the guidance render's graph is freed before the reference one.
            values = dict(info)
            self._backward(losses, values)
            # 7. The reference view holds the image: RGB, mask, depth (and normal).
            if reference is not None:
                ref_cam = self._reference_camera(ranges, cfg.render_res)
                ref_out = render_neus(neus, ref_cam, torch.ones(3, device=self.device),
                                      cfg.num_samples, cos_anneal_ratio=anneal, occupancy=occupancy,
                                      stratified=True, generator=self.device_generator)
                ref_depth = view_axis_depth(ref_out["depth"], ref_out["opacity"], ref_cam)
                ref = reference_terms(reference, ref_cam, ref_out["rgb"], ref_out["opacity"],
                                      ref_depth, ref_out["normal"])
                ref_losses = {"ref_rgb": (cfg.ref_rgb_weight, ref["rgb"]),
                              "ref_mask": (cfg.ref_mask_weight, ref["mask"])}
                if "depth" in ref:
                    ref_losses["ref_depth"] = (cfg.ref_depth_weight, ref["depth"])
                if "normal" in ref:
                    ref_losses["ref_normal"] = (cfg.ref_normal_weight, ref["normal"])
                self._backward(ref_losses, values)
            # 8. One optimiser step on the summed gradients.
            optimiser.step()
            # 9. Stream: progress (+ preview), a mesh from the SDF, a checkpoint.
            self._after_step(cadence, step, timer, values, out["rgb"],
                             mesh_fn=lambda: self._neus_mesh(neus),
                             modules={"neus": neus}, optimisers={"coarse": optimiser},
                             tensors=occupancy_state(occupancy))
        hybrid.close()
        return neus

    # Stage 2: geometry (DMTet) -------------------------------------------------------------------

    def geometry_stage(self, neus, resume: ckpt.Checkpoint | None) -> tuple[Tensor, Tensor, Any]:
        """The refined mesh (verts_vx3, faces_fx3) and the NeuS field it came from."""
        from backend.cameras import sample_cameras
        from backend.dmtet import DMTet
        from backend.raster import render_mesh
        from backend.stages.losses import (normal_consistency_loss, reference_terms,
                                           shade_colors, shade_normals)

        cfg = self.config.geometry
        self.stage = "geometry"
        if resume is not None and neus is None:
            neus = self._new_neus()
            neus.load_state_dict(resume.modules["neus"])
        neus.update_step(self.config.coarse.steps)  # every hash-grid level the coarse stage reached
        neus.requires_grad_(False)  # its colour field is inherited as it is: only DMTet learns
        dmtet = DMTet.from_sdf(neus, cfg.dmtet_res, self.device, padding=0.1)
        optimiser = torch.optim.Adam(dmtet.parameters(), lr=cfg.lr)
        start = self._restore(resume, {"dmtet": dmtet}, {"geometry": optimiser})
        hybrid = self._hybrid_guidance(1, cfg.t_range, cfg.t_range, t_range_3d=cfg.t_range_3d)
        reference = self._reference(cfg.render_res)
        white = torch.ones(3, device=self.device)
        ranges = self._camera_ranges()
        cadence = self._cadence(cfg.steps)
        self._stage_start("geometry", cfg.steps, start, {"neus": neus, "dmtet": dmtet},
                          {"geometry": optimiser})
        timer = StepTimer(cfg.steps - start)
        for step in range(start, cfg.steps):
            self.step = step
            # 1. Stop here if the job was cancelled.
            self.ctx.check_cancelled()
            # 2. Extract the current mesh (marching tetrahedra, differentiable).
            verts_vx3, faces_fx3 = dmtet.extract()
            if len(faces_fx3) == 0:
                raise JobFailed(f"the surface vanished at geometry step {step}; "
                                "try another seed or more coarse steps")
            # 3. Rasterise random views: normal-shaded, and coloured by NeuS's colour field
            #    (over white) where a prior looks at colours.
            cams = sample_cameras(ranges, cfg.batch, cfg.render_res, cfg.render_res, 1.0,
                                  self.generator, self.device)
            render = render_mesh(self.rasterizer, verts_vx3, faces_fx3, cams)
            rgb_step = step % cfg.rgb_every == 0
            rgb = None
            if rgb_step or hybrid.uses_zero123:
                rgb = shade_colors(render, neus.color, white)
            shown = rgb if rgb_step else shade_normals(render)
            # 4. SDS: the 2D prior on the normals (the colours every `rgb_every` steps),
            #    Zero123 (with an image) on the colours.
            losses = {}
            sds, info = hybrid.loss(shown, cams, step, self.device_generator, rgb_3d_bxhxwx3=rgb)
            losses["hybrid_sds"] = (1.0, sds)
            # 5. The reference view's colours, mask and depth.
            if reference is not None:
                ref_cam = self._reference_camera(ranges, cfg.render_res)
                ref_render = render_mesh(self.rasterizer, verts_vx3, faces_fx3, ref_cam)
                ref = reference_terms(reference, ref_cam, shade_colors(ref_render, neus.color, white),
                                      ref_render.mask, ref_render.depth, ref_render.normal)
                losses["ref_rgb"] = (cfg.ref_rgb_weight, ref["rgb"])
                losses["ref_mask"] = (cfg.ref_mask_weight, ref["mask"])
                if "depth" in ref:
                    losses["ref_depth"] = (cfg.ref_depth_weight, ref["depth"])
            # 6. Smoothness: neighbouring faces should agree on their normals.
            losses["normal_consistency"] = (self._normal_consistency_weight(step),
                                            normal_consistency_loss(verts_vx3, faces_fx3))
            # 7. One optimiser step on the weighted sum (a diverged loss stops the job).
            values = self._optimise(optimiser, losses, info)
            # 8. Stream: progress (+ preview), the extracted mesh, a checkpoint.
            self._after_step(cadence, step, timer, values, shown,
                             mesh_fn=lambda: (verts_vx3.detach(), faces_fx3),
                             modules={"neus": neus, "dmtet": dmtet},
                             optimisers={"geometry": optimiser})
        hybrid.close()
        with torch.no_grad():
            verts_vx3, faces_fx3 = dmtet.extract()
        if len(faces_fx3) == 0:
            raise JobFailed("the geometry stage produced an empty mesh; "
                            "try another seed or more coarse steps")
        if cfg.steps == 0:  # geometry skipped: stream the mesh the texture stage will use
            emit_mesh(self.ctx, "geometry", 0, verts_vx3, faces_fx3)
        return verts_vx3.detach(), faces_fx3, neus

    def surface_from_mesh(self, verts_vx3: Tensor, faces_fx3: Tensor) -> Surface:
        """The generated mesh decimated to the face budget, with xatlas UVs; its output
        coordinates are the scene's."""
        from backend.decimate import decimate
        from backend.texture import unwrap

        mesh = decimate(verts_vx3, faces_fx3, self.config.target_faces, self.ctx.check_cancelled)
        for note in mesh.notes:
            self.ctx.emit("note", {"stage": "texture", "text": note})
        uv_mesh = unwrap(mesh.verts_vx3, mesh.faces_fx3, self.config.texture_size,
                         check_cancelled=self.ctx.check_cancelled)
        verts = torch.as_tensor(uv_mesh.verts_vx3, device=self.device)
        return Surface(
            verts_vx3=verts,
            faces_fx3=torch.as_tensor(uv_mesh.faces_fx3, device=self.device),
            uvs_vx2=torch.as_tensor(uv_mesh.uvs_vx2, device=self.device),
            out_verts_vx3=verts.clone(),
        )

    def surface_from_input(self) -> Surface:
        """The refine mesh: its own UVs when sent, else xatlas; positions kept for the output."""
        from backend.texture import unwrap

        mesh = self.mesh_in
        if mesh.uvs_vx2 is not None:
            normalised, faces, uvs, original = (mesh.normalised_vx3, mesh.faces_fx3,
                                                mesh.uvs_vx2, mesh.verts_vx3)
        else:
            uv_mesh = unwrap(mesh.normalised_vx3, mesh.faces_fx3, self.config.texture_size,
                             check_cancelled=self.ctx.check_cancelled)
            normalised, faces, uvs = uv_mesh.verts_vx3, uv_mesh.faces_fx3, uv_mesh.uvs_vx2
            original = mesh.verts_vx3[uv_mesh.vmapping_v]
        as_tensor = lambda array, dtype: torch.as_tensor(np.ascontiguousarray(array), dtype=dtype,  # noqa: E731
                                                         device=self.device)
        return Surface(as_tensor(normalised, torch.float32), as_tensor(faces, torch.int32),
                       as_tensor(uvs, torch.float32), as_tensor(original, torch.float32))

    # Stage 3: texture (BSD) ----------------------------------------------------------------------

    def texture_stage(self, neus, surface: Surface | None, resume: ckpt.Checkpoint | None):
        """The colour field on the fixed surface (and the surface), after BSD."""
        from backend.guidance.bsd import BSD
        from backend.texture import ColorField

        self.stage = "texture"
        if resume is not None:
            surface = Surface.from_tensors(resume.tensors, self.device)
        elif surface is None:
            surface = self.surface_from_input()
        color = ColorField(self._color_config(), 1.0, self.device)
        prior = self.guidance.texture  # the latent prior (SD beside IF); prompts from its own text encoder
        bsd = BSD(prior, self._embeddings(view_dependent=True, prior=prior),
                  self._bsd_config(), self.device_generator)
        try:
            self._texture_loop(neus, surface, color, bsd, resume)
        finally:
            bsd.close()  # the shared UNet is the plain prior again for the next job
        return color, surface

    def _texture_loop(self, neus, surface: Surface, color, bsd, resume: ckpt.Checkpoint | None) -> None:
        from backend.cameras import sample_cameras
        from backend.stages.losses import fit_color_field, reference_terms, render_colors

        cfg = self.config.texture
        optimiser = torch.optim.Adam(color.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-15)
        modules = {"color": color, "bsd": ckpt.BSDState(bsd)}
        start = self._restore(resume, modules, {"texture": optimiser})
        # A fresh start fits the colour field to what is known: the input texture or NeuS.
        if resume is None:
            target = self._initial_colors(neus)
            if target is not None:
                fit_color_field(color, surface, target, cfg.init_fit_steps, cfg.lr,
                                self.rasterizer, self.generator, self.device, self.ctx)
        reference = self._reference(cfg.render_res)
        ranges = self._camera_ranges()
        cadence = self._cadence(cfg.steps)
        self._stage_start("texture", cfg.steps, start, modules, {"texture": optimiser},
                          tensors=surface.tensors())
        timer = StepTimer(cfg.steps - start)
        for step in range(start, cfg.steps):
            self.step = step
            # 1. Stop here if the job was cancelled.
            self.ctx.check_cancelled()
            # 2. Render the colour field on the fixed surface from random views.
            cams = sample_cameras(ranges, cfg.batch, cfg.render_res, cfg.render_res, 1.0,
                                  self.generator, self.device)
            background = torch.rand(3, generator=self.generator).to(self.device)
            rgb, _ = render_colors(self.rasterizer, surface, color, cams, background)
            # 3. BSD: the bootstrap phase trains the DreamBooth LoRA (no texture gradient), the
            #    rest distils the difference of the two scores into the colours.
            try:
                bsd_loss, info = bsd.step(rgb, cams, step, cfg.steps)
            except FloatingPointError as exc:
                raise self._diverged(str(exc)) from exc
            optimiser.zero_grad(set_to_none=True)
            values = dict(info)
            if bsd_loss is not None:  # backward now: the render's graph goes before the next
                self._backward({"bsd": (cfg.bsd_weight, bsd_loss)}, values)
            # 4. The reference view keeps the image's colours.
            if reference is not None:
                ref_cam = self._reference_camera(ranges, cfg.render_res)
                ref_rgb, ref_render = render_colors(self.rasterizer, surface, color, ref_cam,
                                                    torch.ones(3, device=self.device))
                ref = reference_terms(reference, ref_cam, ref_rgb, ref_render.mask)
                self._backward({"ref_rgb": (cfg.ref_rgb_weight, ref["rgb"])}, values)
            # 5. One optimiser step on the summed gradients (none in a text-only bootstrap step).
            if bsd_loss is not None or reference is not None:
                optimiser.step()
            # 6. Stream: progress (+ preview), the mesh with vertex colours, a checkpoint.
            self._after_step(cadence, step, timer, values, rgb,
                             mesh_fn=lambda: self._colored_surface(surface, color),
                             modules=modules, optimisers={"texture": optimiser},
                             tensors=surface.tensors())

    def finish(self, color, surface: Surface) -> None:
        """Bake the colour field into the UV texture, hand over the GLB, emit the final mesh."""
        from backend.export import encode_png, write_glb
        from backend.texture import UVMesh, bake_texture

        uv_mesh = UVMesh(
            verts_vx3=surface.verts_vx3.cpu().numpy(),
            faces_fx3=surface.faces_fx3.cpu().numpy(),
            uvs_vx2=surface.uvs_vx2.cpu().numpy(),
            vmapping_v=np.arange(len(surface.verts_vx3)),
        )
        with torch.no_grad():
            texture_rgb = bake_texture(uv_mesh, color, self.config.texture_size,
                                       self.rasterizer, self.device,
                                       check_cancelled=self.ctx.check_cancelled)
        out_verts = surface.out_verts_vx3.cpu().numpy()
        glb = write_glb(None, out_verts, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2,
                        texture_rgb=texture_rgb, metadata={"dreamloom_models": self.guidance.names()})
        self.ctx.set_result(glb)
        emit_mesh(self.ctx, "texture", self.config.texture.steps, out_verts, uv_mesh.faces_fx3,
                  final=True, uvs_vx2=uv_mesh.uvs_vx2, texture_png=encode_png(texture_rgb))

    # Shared pieces of the loops ------------------------------------------------------------------

    def _stage_start(self, stage: str, steps: int, start: int, modules: dict, optimisers: dict,
                     tensors: dict | None = None) -> None:
        """The stage-start checkpoint (not when resuming mid-stage), then the `stage` event: a
        process killed once the event is out resumes in this stage, never before it. The event
        names the models the stage runs on (role -> name; "oracle:..." for oracles)."""
        if start == 0:
            self._save(stage, 0, modules, optimisers, tensors)
        self.ctx.emit("stage", {"stage": stage, "steps": steps, "models": self.guidance.names()})

    def _after_step(self, cadence: Cadence, step: int, timer: "StepTimer", values: dict,
                    render: Tensor, mesh_fn, modules: dict, optimisers: dict,
                    tensors: dict | None = None) -> None:
        """Progress (with a preview when due), a mesh when due, a checkpoint when due."""
        timer.tick()
        preview = preview_png(render[:1]) if cadence.preview_due(step) else None
        self.ctx.progress(self.stage, step + 1, cadence.steps, eta_s=timer.eta_s(),
                          losses=values, preview_png=preview)
        if cadence.mesh_due(step):
            mesh = mesh_fn()
            if not bool(torch.isfinite(mesh[0]).all()):
                raise self._diverged("non-finite mesh")
            emit_mesh(self.ctx, self.stage, step + 1, mesh[0], mesh[1],
                      colors_vx3=mesh[2] if len(mesh) > 2 else None)
        if cadence.checkpoint_due(step):
            self._save(self.stage, step + 1, modules, optimisers, tensors)

    def _save(self, stage: str, step: int, modules: dict, optimisers: dict,
              tensors: dict | None = None) -> None:
        state = ckpt.Checkpoint(
            stage=stage,
            step=step,
            modules={name: module.state_dict() for name, module in modules.items()},
            optimisers={name: opt.state_dict() for name, opt in optimisers.items()},
            tensors=dict(tensors or {}),
            rng=ckpt.capture_rng(self._generators()),
            job_key=self.key,
        )
        self.ctx.save_checkpoint(ckpt.to_bytes(state))

    def _load_checkpoint(self, first_stage: str) -> ckpt.Checkpoint | None:
        if not getattr(self.ctx, "resumed", False):
            return None
        data = self.ctx.load_checkpoint()
        if data is None:
            return None
        try:
            state = ckpt.from_bytes(data)
        except ckpt.OtherFormat as exc:  # written by another release: its state does not fit this one
            self.ctx.emit("note", {"stage": first_stage, "text": (
                f"the job's checkpoint was written by another release ({exc}); "
                "it starts again from the beginning")})
            return None
        if state.job_key != self.key:
            return None  # another job's or another version's: start afresh
        return state

    def _restore(self, resume: ckpt.Checkpoint | None, modules: dict, optimisers: dict) -> int:
        """Load modules, optimisers and random state from `resume`; the step to start from."""
        if resume is None:
            return 0
        for name, module in modules.items():
            if name in resume.modules:
                module.load_state_dict(resume.modules[name])
        for name, optimiser in optimisers.items():
            if name in resume.optimisers:
                optimiser.load_state_dict(resume.optimisers[name])
        ckpt.restore_rng(resume.rng, self._generators())
        return resume.step

    def _generators(self) -> dict[str, torch.Generator]:
        return {"cpu": self.generator, "device": self.device_generator}

    def _backward(self, losses: dict[str, tuple[float, Tensor]], values: dict[str, float]) -> None:
        """Backward the weighted sum of `losses` now (its graph is freed), adding each loss value
        and the running "total" to `values` (for progress); a sum that is not finite stops the
        job."""
        from backend.stages.losses import sum_losses

        total, parts = sum_losses(losses)
        parts["total"] += values.get("total", 0.0)
        values.update(parts)
        if not torch.isfinite(total).item():
            bad = [name for name, value in values.items() if not math.isfinite(value)]
            raise self._diverged(f"NaN loss: {', '.join(bad)}" if bad else "NaN loss")
        total.backward()

    def _optimise(self, optimiser: torch.optim.Optimizer, losses: dict[str, tuple[float, Tensor]],
                  info: dict[str, float]) -> dict[str, float]:
        """One step of `optimiser` on the weighted sum of `losses`. Returns the loss values (with
        the guidance's `info`) for progress."""
        optimiser.zero_grad(set_to_none=True)
        values = dict(info)
        self._backward(losses, values)
        optimiser.step()
        return values

    def _diverged(self, what: str) -> JobFailed:
        return JobFailed(
            f"the optimisation diverged ({what}) at {self.stage} step {self.step}; "
            "try another seed or a lower guidance scale"
        )

    def _oom_reason(self) -> str:
        cfg = self.config
        res = getattr(cfg, self.stage).render_res
        lower = "draft" if cfg.quality != "draft" else "a smaller texture size"
        return (f"the GPU ran out of memory in the {self.stage} stage (quality "
                f"{cfg.quality}, {res}x{res} renders, texture {cfg.texture_size}); "
                f"try quality {lower} or close other programs using the GPU")

    def _cadence(self, steps: int) -> Cadence:
        stream = self.config.stream
        return Cadence(steps, stream.mesh_every, stream.preview_every, stream.checkpoint_every,
                       stream.first_mesh_at)

    def _camera_ranges(self):
        from types import SimpleNamespace

        from backend.cameras import CameraRanges, ViewPose

        camera = self.config.camera
        return CameraRanges.from_params(SimpleNamespace(
            reference=ViewPose(*camera.reference),
            elevation_deg=camera.elevation_deg,
            azimuth_deg=camera.azimuth_deg,
            distance=camera.distance,
            fov_deg=self._text_only_fov() or camera.fov_deg,
        ))

    def _text_only_fov(self) -> tuple[float, float] | None:
        """The widened field-of-view range of a text-only job's training views, or None
        (image jobs, or ranges that frame the whole scene already)."""
        return text_only_fov_deg(self.config.camera) if self.reference_source is None else None

    def _widen(self, step: int) -> float:
        """Progressive view training: 0 (the reference view) to 1 (the full ranges) over the
        first `widen_fraction` of the coarse stage; text-only jobs use the full ranges."""
        cfg = self.config.coarse
        if self.reference_source is None:
            return 1.0
        return min(1.0, step / max(1.0, cfg.widen_fraction * cfg.steps))

    def _normal_consistency_weight(self, step: int) -> float:
        """The geometry stage's normal-consistency weight at `step`: its two values (relative
        to the 2D prior's SDS weight) joined linearly between the ramp's fractions."""
        cfg = self.config.geometry
        (first, last), (ramp_start, ramp_end) = cfg.normal_consistency, cfg.normal_consistency_ramp
        fraction = step / max(1, cfg.steps)
        span = max(ramp_end - ramp_start, 1e-9)
        along = min(1.0, max(0.0, (fraction - ramp_start) / span))
        return self._balance().sds_weight * (first + (last - first) * along)

    def _reference_camera(self, ranges, size: int):
        """The reference view at `size`² pixels (each stage draws it at its own render size)."""
        from backend.cameras import reference_camera

        return reference_camera(ranges, size, size, self.device)

    def _mask_reference(self):
        """The job's reference image decoded and masked once (a `MaskedImage`: the matting
        model runs here, at most once per job), or None for text-only jobs; every stage
        prepares its own size from it."""
        if "image" not in self.ctx.inputs:
            return None
        from backend.guidance.reference import mask_image

        return mask_image(self.ctx.inputs["image"], models=self.guidance)

    def _reference(self, size: int):
        """The reference prepared at `size`² (mask, recentring, depth), made once per size; None
        for text-only jobs."""
        if self.reference_source is None:
            return None
        if size not in self._prepared_references:
            from backend.guidance.reference import prepare_reference

            self._prepared_references[size] = prepare_reference(
                self.reference_source, size=size, models=self.guidance, device=self.device)
        return self._prepared_references[size]

    def _zero123_reference(self):
        """Zero123's encoding of the reference image (None for text-only jobs), made once from
        the copy prepared at Zero123's own input size."""
        if self.reference_source is None or self.guidance.zero123 is None:
            return None
        if self._z123_reference is None:
            reference = self._reference(self.guidance.zero123.resolution)
            self._z123_reference = self.guidance.zero123.encode_reference(reference.rgb_hxwx3, reference.mask_hxwx1)
        return self._z123_reference

    def _embeddings(self, view_dependent: bool, prior=None):
        """The job's prompts encoded by `prior` (the 2D prior by default)."""
        from backend.guidance.sds import encode_prompt

        params = self.ctx.params
        return encode_prompt(prior or self.guidance.prior2d, params.prompt, params.negative_prompt,
                             view_dependent=view_dependent)

    def _balance(self):
        """The hybrid SDS weights and scales of the loaded 2D prior's row (`prior.balance`)."""
        return self.config.balance(self.guidance.prior2d.balance)

    def _hybrid_guidance(self, anneal_steps: int, t_start: tuple[float, float],
                         t_end: tuple[float, float], t_range_3d: tuple[float, float] | None = None):
        """λ_sd·L_SDS + λ_3d·L_3D-SDS with the prior's balance; the 2D prior's timesteps move from
        `t_start` to `t_end` over `anneal_steps`, Zero123's too unless `t_range_3d` fixes them."""
        from backend.guidance.schedule import HybridConfig, HybridGuidance

        balance = self._balance()
        elevation, azimuth, distance, _ = self.config.camera.reference
        return HybridGuidance(
            self.guidance,
            self._embeddings(view_dependent=True),
            self._zero123_reference(),
            (elevation, azimuth, distance),
            HybridConfig(
                sds_weight=balance.sds_weight,
                zero123_weight=balance.zero123_weight,
                anneal_steps=anneal_steps,
                t_start=t_start,
                t_end=t_end,
                t_start_3d=t_range_3d,
                t_end_3d=t_range_3d,
                guidance_scale_2d=balance.guidance_scale,
                guidance_scale_3d=balance.guidance_scale_3d,
                perp_neg=balance.perp_neg,
                distill=self.config.distill,
            ),
        )

    def _new_neus(self):
        """A NeuS field sized by the coarse config (starts as a sphere)."""
        from backend.hashgrid import HashGridConfig
        from backend.neus import NeuSConfig, NeuSField

        cfg = self.config.coarse
        grid = HashGridConfig(num_levels=cfg.grid_levels, log2_table_size=cfg.grid_log2_table_size,
                              start_levels=cfg.grid_start_levels,
                              level_every_steps=cfg.grid_level_every if cfg.grid_start_levels else 0)
        return NeuSField(NeuSConfig(grid=grid, hidden_dim=cfg.hidden_dim), self.device)

    @staticmethod
    def _neus_groups(neus, lr: float) -> list[dict]:
        """The hash grid at `lr`, the MLPs and the sharpness at a tenth of it."""
        grid = list(neus.encoding.parameters())
        grid_ids = {id(p) for p in grid}
        rest = [p for p in neus.parameters() if id(p) not in grid_ids]
        return [{"params": grid, "lr": lr}, {"params": rest, "lr": lr * 0.1}]

    def _color_config(self):
        from backend.texture import ColorFieldConfig

        cfg = self.config.texture
        return ColorFieldConfig(num_levels=cfg.color_levels,
                                log2_hashmap_size=cfg.color_log2_table_size,
                                hidden_dim=cfg.color_hidden_dim)

    def _bsd_config(self):
        from backend.guidance.bsd import BSDConfig

        cfg = self.config.texture
        return BSDConfig(lora_rank=cfg.lora_rank, guidance_scale=cfg.guidance_scale,
                         restore_guidance_scale=cfg.restore_guidance_scale, t_min=cfg.t_min,
                         t_max=cfg.t_max, restore_steps=cfg.restore_steps,
                         bootstrap_period=cfg.bootstrap_period, restore_every=cfg.restore_every,
                         cache_size=cfg.cache_size)

    def _initial_colors(self, neus):
        """What the colour field starts from: the input texture (refine, when its UVs came with
        it), NeuS's colours (generate), or nothing."""
        from backend.texture import sample_texture

        mesh = self.mesh_in
        if mesh is not None and mesh.texture_rgb is not None and mesh.uvs_vx2 is not None:
            texture = self.mesh_in.texture_rgb
            return lambda points_nx3, uvs_nx2: sample_texture(uvs_nx2, texture)
        if neus is not None:
            return lambda points_nx3, uvs_nx2: neus.color(points_nx3)
        return None

    def _neus_mesh(self, neus) -> tuple[Tensor, Tensor]:
        """A mesh of the SDF's zero level set (marching tetrahedra at `mesh_res`)."""
        from backend.dmtet import extract_mesh_from_sdf

        with torch.no_grad():
            try:
                return extract_mesh_from_sdf(neus.sdf, self.config.coarse.mesh_res, self.device)
            except ValueError as exc:  # the SDF is no longer finite
                raise self._diverged(f"the SDF: {exc}") from exc

    def _colored_surface(self, surface: Surface, color) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            colors_vx3 = color(surface.verts_vx3)
        return surface.out_verts_vx3, surface.faces_fx3, colors_vx3


def occupancy_state(occupancy) -> dict[str, Tensor]:
    """The occupancy grid's cells for a checkpoint (an exact resume skips the same samples)."""
    return {} if occupancy is None else {"occupancy_g3": occupancy.occupied_g3}


class StepTimer:
    """Seconds per step in a stage, for `eta_s`."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.started = time.monotonic()
        self.done = 0

    def tick(self) -> None:
        self.done += 1

    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        per_step = (time.monotonic() - self.started) / self.done
        return per_step * max(0, self.remaining - self.done)

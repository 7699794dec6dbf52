"""The generation pipeline: prompt (+ reference image) -> textured mesh, in three stages.

    1. coarse    a NeuS field, volume rendered, optimised with hybrid SDS (2D prior with
                 view-dependent prompts + mu * Zero123 3D-SDS when an image is given), the
                 reference-view losses, eikonal and sparsity; views widen, timesteps anneal.
    2. geometry  `DMTet.from_sdf(neus)`, rasterised normal-shaded renders under SDS (+ Zero123 and
                 reference mask/depth losses); the mesh is extracted every step.
    3. texture   the surface fixed and decimated to the face budget, xatlas UVs, a `ColorField`
                 sharpened by BSD (+ the reference RGB loss), then baked into the UV texture.

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

from backend.config import STAGES, PipelineConfig, config_for_job
from backend.jobs import JobFailed
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
    """A preset forced on every job ("tiny" with the tiny models), else None: the job's quality."""
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


def make_runner(models: str, device: str) -> PipelineRunner:
    """The runner `python -m backend serve` and the CLI use: guidance models `models`
    ("default", "tiny" or a folder) loaded on `device` ("cpu", "cuda", "cuda:1")."""
    from backend.guidance.models import load_models

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    guidance = load_models(models, torch_device)
    return PipelineRunner(
        guidance=guidance,
        torch_device=torch_device,
        preset="tiny" if models == "tiny" else None,
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
        self.reference = self._prepare_reference()
        # 2. Where to start: the newest checkpoint of this job, or the beginning.
        resume = self._load_checkpoint()
        first = STAGES.index(resume.stage) if resume else (2 if refine else 0)
        # 3. The stages in order, each handing a typed object to the next.
        neus = surface = None
        try:
            if first <= 0:
                neus = self.coarse_stage(resume if first == 0 else None)
            if first <= 1 and not refine:
                verts_vx3, faces_fx3, neus = self.geometry_stage(neus, resume if first == 1 else None)
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
        from backend.stages.losses import reference_terms, view_axis_depth

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
        hybrid = self._hybrid_guidance(cfg.steps, cfg, cfg.t_start, cfg.t_end)
        ranges = self._camera_ranges()
        cadence = self._cadence(cfg.steps)
        self._stage_start("coarse", cfg.steps, start, {"neus": neus}, {"coarse": optimiser},
                          occupancy_state(occupancy))
        timer = StepTimer(cfg.steps - start)
        for step in range(start, cfg.steps):
            self.step = step
            # 1. Stop here if the job was cancelled.
            self.ctx.check_cancelled()
            # 2. Random views, widening from the reference view to the full ranges.
            cams = sample_cameras(ranges, cfg.batch, cfg.render_res, cfg.render_res,
                                  self._widen(step), self.generator, self.device)
            # 3. Volume-render the field (a random background keeps it from painting the sky).
            neus.update_step(step)
            if occupancy is not None:
                occupancy.update(neus, step)
            anneal = cos_anneal(step, cfg.cos_anneal_steps)
            background = torch.rand(3, generator=self.generator).to(self.device)
            out = render_neus(neus, cams, background, cfg.num_samples, cos_anneal_ratio=anneal,
                              occupancy=occupancy, stratified=True, generator=self.device_generator)
            # 4. Hybrid SDS at annealed timesteps (2D prior + mu * Zero123 with an image).
            losses = {}
            sds, info = hybrid.loss(out["rgb"], cams, step, self.device_generator)
            losses["hybrid_sds"] = (cfg.sds_weight, sds)
            # 5. The reference view holds the image: RGB, mask, depth (and normal).
            if self.reference is not None:
                ref_cam = self._reference_camera(ranges)
                ref_out = render_neus(neus, ref_cam, torch.ones(3, device=self.device),
                                      cfg.num_samples, cos_anneal_ratio=anneal, occupancy=occupancy)
                ref_depth = view_axis_depth(ref_out["depth"], ref_out["opacity"], ref_cam)
                ref = reference_terms(self.reference, ref_cam, ref_out["rgb"], ref_out["opacity"],
                                      ref_depth, ref_out["normal"])
                losses["ref_rgb"] = (cfg.ref_rgb_weight, ref["rgb"])
                losses["ref_mask"] = (cfg.ref_mask_weight, ref["mask"])
                if "depth" in ref:
                    losses["ref_depth"] = (cfg.ref_depth_weight, ref["depth"])
                if "normal" in ref:
                    losses["ref_normal"] = (cfg.ref_normal_weight, ref["normal"])
            # 6. Regularisers: eikonal on the SDF gradient, sparsity of the opacity.
            losses["eikonal"] = (cfg.eikonal_weight, out["eikonal"])
            losses["sparsity"] = (cfg.sparsity_weight, out["opacity"].mean())
            # 7. One optimiser step on the weighted sum (a diverged loss stops the job).
            values = self._optimise(optimiser, losses, info)
            # 8. Stream: progress (+ preview), a mesh from the SDF, a checkpoint.
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
                                           shade_normals)

        cfg = self.config.geometry
        self.stage = "geometry"
        if resume is not None and neus is None:
            neus = self._new_neus()
            neus.load_state_dict(resume.modules["neus"])
        neus.update_step(self.config.coarse.steps)  # every hash-grid level the coarse stage reached
        dmtet = DMTet.from_sdf(neus, cfg.dmtet_res, self.device)
        optimiser = torch.optim.Adam(dmtet.parameters(), lr=cfg.lr)
        start = self._restore(resume, {"dmtet": dmtet}, {"geometry": optimiser})
        hybrid = self._hybrid_guidance(cfg.steps, cfg, cfg.t_range, cfg.t_range)
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
            # 3. Rasterise normal-shaded views from random cameras.
            cams = sample_cameras(ranges, cfg.batch, cfg.render_res, cfg.render_res, 1.0,
                                  self.generator, self.device)
            render = render_mesh(self.rasterizer, verts_vx3, faces_fx3, cams)
            shaded = shade_normals(render)
            # 4. SDS on the shaded renders (+ Zero123 with an image).
            losses = {}
            sds, info = hybrid.loss(shaded, cams, step, self.device_generator)
            losses["hybrid_sds"] = (cfg.sds_weight, sds)
            # 5. The reference view's mask and depth.
            if self.reference is not None:
                ref_cam = self._reference_camera(ranges)
                ref_render = render_mesh(self.rasterizer, verts_vx3, faces_fx3, ref_cam)
                ref = reference_terms(self.reference, ref_cam, None, ref_render.mask,
                                      ref_render.depth, ref_render.normal)
                losses["ref_mask"] = (cfg.ref_mask_weight, ref["mask"])
                if "depth" in ref:
                    losses["ref_depth"] = (cfg.ref_depth_weight, ref["depth"])
            # 6. Smoothness: neighbouring faces should agree on their normals.
            losses["normal_consistency"] = (cfg.normal_consistency_weight,
                                            normal_consistency_loss(verts_vx3, faces_fx3))
            # 7. One optimiser step on the weighted sum (a diverged loss stops the job).
            values = self._optimise(optimiser, losses, info)
            # 8. Stream: progress (+ preview), the extracted mesh, a checkpoint.
            self._after_step(cadence, step, timer, values, shaded,
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
        bsd = BSD(self.guidance.prior2d, self._embeddings(view_dependent=True),
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
            # 3. BSD: the LoRAs learn the renders' score, the colours follow the prior.
            losses = {}
            try:
                bsd_loss, info = bsd.step(rgb, cams, step, cfg.steps)
            except FloatingPointError as exc:
                raise self._diverged(str(exc)) from exc
            losses["bsd"] = (cfg.bsd_weight, bsd_loss)
            # 4. The reference view keeps the image's colours.
            if self.reference is not None:
                ref_cam = self._reference_camera(ranges)
                ref_rgb, ref_render = render_colors(self.rasterizer, surface, color, ref_cam,
                                                    torch.ones(3, device=self.device))
                ref = reference_terms(self.reference, ref_cam, ref_rgb, ref_render.mask)
                losses["ref_rgb"] = (cfg.ref_rgb_weight, ref["rgb"])
            # 5. One optimiser step on the weighted sum (a diverged loss stops the job).
            values = self._optimise(optimiser, losses, info)
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

    def _load_checkpoint(self) -> ckpt.Checkpoint | None:
        if not getattr(self.ctx, "resumed", False):
            return None
        data = self.ctx.load_checkpoint()
        if data is None:
            return None
        state = ckpt.from_bytes(data)
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

    def _optimise(self, optimiser: torch.optim.Optimizer, losses: dict[str, tuple[float, Tensor]],
                  info: dict[str, float]) -> dict[str, float]:
        """Sum the weighted `losses`, stop the job if the sum is not finite, else take one step
        of `optimiser`. Returns the loss values (with the guidance's `info`) for progress."""
        from backend.stages.losses import sum_losses

        total, values = sum_losses(losses)
        values.update(info)
        if not torch.isfinite(total).item():
            bad = [name for name, value in values.items() if not math.isfinite(value)]
            raise self._diverged(f"NaN loss: {', '.join(bad)}" if bad else "NaN loss")
        optimiser.zero_grad(set_to_none=True)
        total.backward()
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
            fov_deg=camera.fov_deg,
        ))

    def _widen(self, step: int) -> float:
        """Progressive view training: 0 (the reference view) to 1 (the full ranges) over the
        first `widen_fraction` of the coarse stage; text-only jobs use the full ranges."""
        cfg = self.config.coarse
        if self.reference is None:
            return 1.0
        return min(1.0, step / max(1.0, cfg.widen_fraction * cfg.steps))

    def _reference_camera(self, ranges):
        """The reference view at the coarse render size (every stage; the reference-view losses
        resize the reference image to it)."""
        from backend.cameras import reference_camera

        size = self.config.coarse.render_res
        return reference_camera(ranges, size, size, self.device)

    def _prepare_reference(self):
        """The reference image, or None for text-only jobs. Prepared once, at the larger of
        Zero123's input size and the coarse render size: Zero123 encodes it as it is, the
        reference-view losses resize it to the reference view's render."""
        if "image" not in self.ctx.inputs:
            return None
        from backend.guidance.reference import prepare_reference

        size = self.config.coarse.render_res
        if self.guidance.zero123 is not None:
            size = max(size, self.guidance.zero123.resolution)
        return prepare_reference(self.ctx.inputs["image"], size=size,
                                 models=self.guidance, device=self.device)

    def _zero123_reference(self):
        """Zero123's encoding of the reference image (None for text-only jobs), made once."""
        if self.reference is None or self.guidance.zero123 is None:
            return None
        if getattr(self, "_z123_reference", None) is None:
            self._z123_reference = self.guidance.zero123.encode_reference(self.reference.rgb_hxwx3,
                                                                          self.reference.mask_hxwx1)
        return self._z123_reference

    def _embeddings(self, view_dependent: bool):
        from backend.guidance.sds import encode_prompt

        params = self.ctx.params
        return encode_prompt(self.guidance.prior2d, params.prompt, params.negative_prompt,
                             view_dependent=view_dependent)

    def _hybrid_guidance(self, steps: int, cfg, t_start: tuple[float, float],
                         t_end: tuple[float, float]):
        """L_SDS + mu * L_3D-SDS with the stage's weights, timesteps annealed over its steps."""
        from backend.guidance.schedule import HybridConfig, HybridGuidance

        elevation, azimuth, distance, _ = self.config.camera.reference
        return HybridGuidance(
            self.guidance,
            self._embeddings(view_dependent=True),
            self._zero123_reference(),
            (elevation, azimuth, distance),
            HybridConfig(
                mu=cfg.zero123_weight,
                anneal_steps=max(1, steps),
                t_start=t_start,
                t_end=t_end,
                guidance_scale_2d=cfg.guidance_scale,
                guidance_scale_3d=cfg.guidance_scale_3d,
                perp_neg=False,
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
                         t_range=cfg.t_range, restore_steps=cfg.restore_steps,
                         finetune_every=cfg.bootstrap_every, finetune_iters=cfg.bootstrap_iters)

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

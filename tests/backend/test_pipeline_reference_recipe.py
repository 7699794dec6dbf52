"""The pipeline follows DreamCraft3D where it matters (docs/pipeline.md, "Following
DreamCraft3D"): what each prior sees, the balance in every progress event, the order of the
backward passes, the schedules' checks, the reference's preparation and the mesh hygiene."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cli_generate import LocalContext
from backend.config import HYBRID_BALANCE, PRESETS, CameraConfig, check_schedules, config_for_job, text_only_fov_deg
from backend.hashgrid import HashGrid
from backend.pipeline import Job, make_runner
from protocol.params import validate_submit


@pytest.fixture(scope="module")
def runner():
    return make_runner("tiny", "cpu")


class RecordingContext(LocalContext):
    """A CLI context that keeps every progress event's losses."""

    def progress(self, stage, step, steps, eta_s=None, losses=None, preview_png=None) -> None:
        super().progress(stage, step, steps, eta_s, losses, preview_png)
        self.seen.append((stage, step, dict(losses or {})))


def _reference_png(alpha: bool = True) -> bytes:
    """A red disc, on transparent black (its alpha is the mask) or on white (no alpha: the
    matting model makes the mask)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0)) if alpha else Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((16, 12, 48, 52), fill=(200, 40, 30, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _job(tmp_path: Path, runner, steps: dict, image: bytes | None = _reference_png(),
         mesh: dict | None = None) -> tuple[Job, RecordingContext]:
    """A generate job, or a refine_texture one of `mesh` (its positions and faces buffers)."""
    kind = "generate" if mesh is None else "refine_texture"
    inputs = {**(mesh or {}), **({"image": image} if image is not None else {})}
    params = {"prompt": "a red ball", "steps": steps, "texture_size": 256, "mesh_every": 100}
    ctx = RecordingContext(out_dir=tmp_path, kind=kind, params=validate_submit(kind, params, inputs),
                           inputs=inputs, show_progress=False)
    ctx.seen = []
    ctx.open("test")
    config = config_for_job(ctx.params, runner.preset)
    return Job(ctx, config, runner.guidance, runner.torch_device), ctx


def _record_inputs(module: torch.nn.Module, job: Job, calls: list) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook on a real model part: keeps (stage, step, input image) of each call."""
    return module.register_forward_pre_hook(
        lambda _, args: calls.append((job.stage, job.step, args[0].detach().float().clone())))


def test_zero123_sees_white_composites_and_the_geometry_stage_colours(tmp_path: Path, runner) -> None:
    """Coarse: Zero123's inputs are white where the render is empty while the 2D prior's show the
    random background. Geometry: Zero123 gets the NeuS-coloured render on every step, the 2D
    prior the same image on the colour steps (every 4th) and the normals on the others."""
    job, _ = _job(tmp_path, runner, {"coarse": 3, "geometry": 3, "texture": 2})
    zero123, prior = [], []
    hooks = [_record_inputs(runner.guidance.zero123.vae.encoder, job, zero123),
             _record_inputs(runner.guidance.prior2d.vae.encoder, job, prior)]
    try:
        job.run()
    finally:
        for hook in hooks:
            hook.remove()
    renders_3d = {(stage, step): image for stage, step, image in zero123[1:]}  # [0]: the reference
    renders_2d = {(stage, step): image for stage, step, image in prior if stage != "texture"}
    corners = (slice(None), slice(None), slice(0, 3), slice(0, 3))
    for step in range(3):
        # VAE inputs are in [-1, 1]: white is +1.
        assert float(renders_3d[("coarse", step)][corners].min()) > 0.9
    assert min(float(renders_2d[("coarse", step)][corners].min()) for step in range(3)) < 0.8
    assert torch.allclose(renders_3d[("geometry", 0)], renders_2d[("geometry", 0)])
    for step in (1, 2):
        assert not torch.allclose(renders_3d[("geometry", step)], renders_2d[("geometry", step)], atol=0.05)


def test_every_progress_reports_both_hybrid_gradient_norms(tmp_path: Path, runner) -> None:
    job, ctx = _job(tmp_path, runner, {"coarse": 3, "geometry": 2, "texture": 5})
    job.run()
    for stage, _, losses in ctx.seen:
        if stage in ("coarse", "geometry"):
            assert losses["grad_sds"] > 0 and losses["grad_sds_3d"] > 0, (stage, losses)
    texture = [losses for stage, _, losses in ctx.seen if stage == "texture"]
    # tiny: a bootstrap period of 5 steps, the first one the bootstrap phase.
    assert len(texture) == 5
    assert "dreambooth" in texture[0] and "bsd" not in texture[0] and texture[0]["cached_views"] == 1
    assert all("grad_bsd" in losses and "ref_rgb" in losses for losses in texture[1:])


def test_the_guidance_backward_runs_before_the_reference_render(tmp_path: Path, runner) -> None:
    """Coarse steps: the hash grid's gradients are empty during the guidance render and already
    filled during the reference render, so the guidance graph is gone by then."""
    job, _ = _job(tmp_path, runner, {"coarse": 3, "geometry": 0, "texture": 0})
    seen: list[tuple[int, bool]] = []

    def record(module, args):
        if isinstance(module, HashGrid) and job.stage == "coarse" and torch.is_grad_enabled():
            seen.append((job.step, any(p.grad is not None for p in module.parameters())))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        job.run()
    finally:
        hook.remove()
    for step in range(3):
        assert [filled for s, filled in seen if s == step] == [False, True], seen


def test_every_preset_has_runnable_schedules_and_a_balance_per_prior() -> None:
    for preset in PRESETS.values():
        check_schedules(preset)
    assert set(HYBRID_BALANCE) == {"pixel", "latent", "oracle"}
    assert PRESETS["standard"].balance("pixel").guidance_scale == 20.0
    assert PRESETS["standard"].balance("latent").zero123_weight == 1.0
    with pytest.raises(ValueError, match="prior kind 'video'"):
        PRESETS["standard"].balance("video")


def test_an_impossible_fraction_is_refused_naming_the_setting() -> None:
    import dataclasses

    config = PRESETS["draft"]
    bad = dataclasses.replace(config, coarse=dataclasses.replace(config.coarse, anneal_fraction=1.5))
    with pytest.raises(ValueError, match=r"coarse.anneal_fraction: .*1.5"):
        check_schedules(bad)
    bad = dataclasses.replace(config, texture=dataclasses.replace(config.texture, restore_every=100))
    with pytest.raises(ValueError, match=r"texture.bootstrap_period = 150, restore_every = 100"):
        check_schedules(bad)


def test_the_reference_keeps_its_edges_free_of_the_transparent_colour() -> None:
    """A flat red disc on transparent black, shrunk: with premultiplied alpha every pixel is
    exactly red·m + white·(1 − m), so the green channel is 1 − m (no dark halo)."""
    from backend.guidance.reference import prepare_reference

    size = 256
    pixels = np.zeros((size, size, 4), dtype=np.float32)
    rows, cols = np.mgrid[:size, :size]
    inside = (rows - 128) ** 2 + (cols - 128) ** 2 < 90**2
    pixels[inside] = (1.0, 0.0, 0.0, 1.0)
    reference = prepare_reference(pixels, size=37)
    mask = reference.mask_hxwx1[..., 0]
    assert float(((mask > 0.05) & (mask < 0.95)).sum()) > 10  # there are soft edge pixels
    assert torch.allclose(reference.rgb_hxwx3[..., 1], 1.0 - mask, atol=1e-5)
    assert torch.allclose(reference.rgb_hxwx3[..., 0], torch.ones_like(mask), atol=1e-5)


def test_each_stage_gets_the_reference_at_its_render_size_from_one_matting(tmp_path: Path, runner) -> None:
    """An image without alpha: the real matting model runs once for the job, and every size
    is resized from that mask."""
    job, _ = _job(tmp_path, runner, {"coarse": 2, "geometry": 2, "texture": 2}, image=_reference_png(alpha=False))
    mattings = []
    hook = runner.guidance.matting.model.register_forward_pre_hook(
        lambda module, args, kwargs: mattings.append(kwargs["pixel_values"].shape), with_kwargs=True)
    try:
        job.run()
    finally:
        hook.remove()
    cfg = job.config
    sizes = {cfg.coarse.render_res, cfg.geometry.render_res, cfg.texture.render_res,
             runner.guidance.zero123.resolution}
    assert len(sizes) > 1 and len(mattings) == 1
    assert set(job._prepared_references) == sizes
    for size, reference in job._prepared_references.items():
        assert reference.rgb_hxwx3.shape == (size, size, 3) and reference.mask_source == "matting"


def test_a_refine_job_prepares_the_reference_only_at_the_texture_size(tmp_path: Path, runner) -> None:
    """Refine jobs skip the coarse stage, so the reference is never prepared at its size."""
    from backend.meshio import load_mesh
    from tests.backend.mesh_runner import MESHES_DIR

    suzanne = load_mesh(MESHES_DIR / "suzanne.obj", triangulate=True)
    mesh = {"positions": suzanne.verts_vx3.astype("<f4"), "faces": suzanne.faces_fx3.astype("<i4")}
    job, _ = _job(tmp_path, runner, {"texture": 2}, mesh=mesh)
    job.run()
    assert job.config.coarse.render_res != job.config.texture.render_res
    assert set(job._prepared_references) == {job.config.texture.render_res}


def _corner_angles_deg(camera: CameraConfig, fov_deg: float) -> torch.Tensor:
    """The angle between the view axis and each corner of the scene cube [-1, 1]³, seen by the
    nearest camera of `camera` from many orbit poses at `fov_deg` (a real `Cameras`)."""
    from backend.cameras import Cameras

    elevation, azimuth = torch.meshgrid(torch.linspace(-80, 80, 9), torch.linspace(-180, 180, 13), indexing="ij")
    count = elevation.numel()
    cameras = Cameras.from_orbit(elevation.flatten(), azimuth.flatten(), torch.full((count,), min(camera.distance)),
                                 torch.full((count,), fov_deg), 64, 64)
    eye_bx3 = cameras.c2w_bx4x4[:, :3, 3]
    corners_8x3 = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    to_corner = torch.nn.functional.normalize(corners_8x3[None] - eye_bx3[:, None], dim=-1)
    to_centre = torch.nn.functional.normalize(-eye_bx3, dim=-1)[:, None]
    return torch.rad2deg(torch.acos((to_corner * to_centre).sum(-1).clamp(-1.0, 1.0)))


def test_a_text_only_job_widens_its_views_until_the_whole_scene_is_in_frame():
    camera = CameraConfig()
    widened = text_only_fov_deg(camera)
    assert widened is not None and widened[0] == widened[1]
    # Every corner of the scene cube lies inside the frame at the widened field of view (the
    # cone of half the vertical angle is inside the square frame), and some lie outside at 20°.
    assert float(_corner_angles_deg(camera, widened[0]).max()) <= widened[0] / 2 + 1e-4
    assert float(_corner_angles_deg(camera, camera.fov_deg[0]).max()) > camera.fov_deg[0] / 2
    # Ranges that already frame the scene, and cameras inside its sphere, are kept.
    assert text_only_fov_deg(CameraConfig(fov_deg=(60.0, 70.0))) is None
    assert text_only_fov_deg(CameraConfig(distance=(1.5, 2.0))) is None
    assert text_only_fov_deg(CameraConfig(fov_deg=(20.0, 80.0))) == (widened[0], 80.0)

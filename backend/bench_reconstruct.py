"""Multi-view reconstruction benchmark of the 3D core: a known mesh is rendered, then rebuilt from
its renders with NeuS -> DMTet -> colour field -> xatlas + baked texture, and compared with it.

Run it as `python -m backend.bench reconstruct --mesh PATH ...` (see `backend.bench`). Steps:

1. load the mesh and normalise it to the unit box;
2. render ground-truth views with the rasteriser (RGB from the texture through the UVs, or the
   world-normal colours (n + 1) / 2 when untextured; mask; depth; normals); training views on
   rings of elevations, evaluation views held out between them;
3. fit NeuS to the training views (random rays: RGB + mask + eikonal, occupancy-grid skipping,
   learnt inv_s);
4. `DMTet.from_sdf(neus, resolution)` and refine its vertex SDF and offsets against the masks,
   depths and normals of the training views;
5. decimate the DMTet surface to the face budget (`backend.decimate`), fit a `ColorField` on it
   to the training views' colours, unwrap with xatlas, bake the texture;
6. write the GLB, OBJ + MTL + PNG, and GT | ours comparison images of held-out views;
7. compute chamfer, F-score, normal consistency and held-out PSNR, also for the initial sphere
   and for the full (undecimated) DMTet surface.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import SCENE_BOUND, Cameras
from backend.decimate import decimate
from backend.dmtet import DMTet, extract_mesh_from_sdf
from backend.export import encode_png, write_glb, write_obj
from backend.hashgrid import HashGridConfig
from backend.meshio import LoadedMesh, normalize_to_unit_box
from backend.metrics import MeshMetrics, chamfer_and_fscore, psnr
from backend.neus import FitConfig, NeuSConfig, NeuSField, OccupancyGrid, fit_to_images
from backend.raster import get_rasterizer, render_mesh
from backend.texture import ColorField, ColorFieldConfig, UVMesh, bake_texture, sample_texture, unwrap

# 0. Presets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityPreset:
    """Sizes and step counts of one benchmark run."""

    train_views: int
    """Ground-truth views the reconstruction sees (`--views` overrides it)."""
    eval_views: int
    """Held-out views for PSNR and the comparison images."""
    image_size: int
    """Height and width of every rendered view, in pixels."""
    neus_steps: int
    """NeuS optimisation steps."""
    neus_rays: int
    """Random rays per NeuS step."""
    neus_samples: int
    """Samples per ray (before occupancy skipping)."""
    neus_levels: int
    """Hash-grid levels of the NeuS field (resolutions grow geometrically from 16 to the finest)."""
    neus_log2_table: int
    """log2 of the NeuS hash table rows per level."""
    neus_max_resolution: int
    """Cells per axis of the finest NeuS hash-grid level."""
    occupancy_resolution: int
    """Cells per axis of the occupancy grid that skips empty space."""
    dmtet_resolution: int
    """Cubes per axis of the DMTet grid over [-DMTET_BOUND, DMTET_BOUND]^3."""
    dmtet_steps: int
    """DMTet refinement steps."""
    dmtet_views_per_step: int
    """Training views rendered per DMTet step."""
    color_steps: int
    """Colour-field fitting steps."""
    color_batch: int
    """Surface points per colour-field step."""
    color_levels: int
    """Hash-grid levels of the colour field."""
    texture_size: int
    """Side of the baked texture, in texels."""
    target_faces: int
    """Face budget the DMTet surface is decimated to before unwrapping (0 keeps every face;
    `--target-faces` overrides it)."""
    metric_points: int
    """Surface samples per mesh for chamfer / F-score / normal consistency."""


PRESETS: dict[str, QualityPreset] = {
    # CPU test: well under a minute on 2 cores with the PyTorch rasteriser.
    "tiny": QualityPreset(
        train_views=12, eval_views=3, image_size=64, neus_steps=80, neus_rays=512, neus_samples=32,
        neus_levels=6, neus_log2_table=14, neus_max_resolution=128, occupancy_resolution=32,
        dmtet_resolution=32, dmtet_steps=30, dmtet_views_per_step=3, color_steps=60,
        color_batch=1024, color_levels=6, texture_size=256, target_faces=5000, metric_points=4000,
    ),
    "draft": QualityPreset(
        train_views=24, eval_views=4, image_size=128, neus_steps=1000, neus_rays=2048, neus_samples=64,
        neus_levels=12, neus_log2_table=17, neus_max_resolution=512, occupancy_resolution=64,
        dmtet_resolution=96, dmtet_steps=200, dmtet_views_per_step=4, color_steps=500,
        color_batch=16384, color_levels=12, texture_size=512, target_faces=50000, metric_points=20000,
    ),
    # GPU: ~4k NeuS steps of 4k rays x 96 samples, then a 192^3 DMTet at 512^2.
    "standard": QualityPreset(
        train_views=48, eval_views=6, image_size=384, neus_steps=4000, neus_rays=4096, neus_samples=96,
        neus_levels=16, neus_log2_table=19, neus_max_resolution=2048, occupancy_resolution=128,
        dmtet_resolution=192, dmtet_steps=1000, dmtet_views_per_step=4, color_steps=1500,
        color_batch=65536, color_levels=16, texture_size=1024, target_faces=50000, metric_points=50000,
    ),
    "high": QualityPreset(
        train_views=72, eval_views=8, image_size=512, neus_steps=8000, neus_rays=8192, neus_samples=128,
        neus_levels=16, neus_log2_table=20, neus_max_resolution=4096, occupancy_resolution=128,
        dmtet_resolution=256, dmtet_steps=2000, dmtet_views_per_step=4, color_steps=3000,
        color_batch=131072, color_levels=16, texture_size=2048, target_faces=150000, metric_points=100000,
    ),
}

TRAIN_ELEVATIONS_DEG = (-20.0, 15.0, 50.0)
"""Rings of training cameras (view i sits on ring i mod 3, azimuth 360 * i / views)."""
EVAL_ELEVATIONS_DEG = (30.0, 0.0)
"""Held-out views alternate between these, at azimuths halfway between training views."""
CAMERA_DISTANCE = 2.6
"""Camera distance from the origin (the unit box's bounding sphere, radius 0.87, fills the view)."""
CAMERA_FOV_DEG = 40.0
"""Vertical field of view."""
BACKGROUND_RGB = (1.0, 1.0, 1.0)
"""Background behind the object in every colour image."""
DMTET_BOUND = 0.6
"""Half the side of the cube the DMTet grid covers: the object lies in the unit box [-0.5, 0.5]^3,
so a grid over [-0.6, 0.6]^3 spends all its cells near it (1/0.6 times finer than over the whole
scene cube [-1, 1]^3 at the same resolution) with a margin that keeps the surface closed."""
GT_BATCH = 8
"""Cameras rendered together (bounds the rasteriser's memory at large image sizes)."""


@dataclass
class BenchOptions:
    """One benchmark run, as the command line gives it."""

    mesh: LoadedMesh
    """The ground-truth mesh (world frame), loaded and validated."""
    texture_rgb: np.ndarray | None
    """Its base-colour image uint8 [H, W, 3], or None (world-normal colours are used instead)."""
    preset: QualityPreset
    """Sizes and step counts."""
    out_dir: Path
    """Where the GLB, OBJ and comparison images go."""
    device: torch.device
    """Where everything runs."""
    seed: int = 0
    """Seed of every random choice (field init, rays, views, metric samples)."""
    log: Callable[[str], None] = print
    """Where progress lines go."""


# 1. Ground truth ---------------------------------------------------------------------------------


@dataclass
class Views:
    """Ground-truth renders of a batch of cameras, [B, H, W, C], row 0 at the top."""

    cameras: Cameras
    """The cameras."""
    rgb: Tensor
    """[B, H, W, 3] surface colour in [0, 1], 0 where empty."""
    mask: Tensor
    """[B, H, W, 1] 1 on the object, 0 elsewhere."""
    depth: Tensor
    """[B, H, W, 1] view-axis depth, 0 where empty."""
    normal: Tensor
    """[B, H, W, 3] world unit normals, 0 where empty."""

    def rgba(self) -> Tensor:
        """[B, H, W, 4]: colour and mask, as NeuS fitting takes them."""
        return torch.cat([self.rgb, self.mask], dim=-1)

    def on_background(self) -> Tensor:
        """[B, H, W, 3]: the colour composited over `BACKGROUND_RGB`."""
        background = torch.tensor(BACKGROUND_RGB, device=self.rgb.device)
        return self.rgb * self.mask + background * (1.0 - self.mask)


def ring_cameras(n: int, elevations_deg: tuple[float, ...], azimuth_offset_deg: float, size: int, device: torch.device) -> Cameras:
    """`n` cameras, camera i on elevation ring i mod len(rings) at azimuth offset + 360 i / n."""
    index_b = torch.arange(n, dtype=torch.float32, device=device)
    elevation_b = torch.tensor(elevations_deg, device=device)[torch.arange(n, device=device) % len(elevations_deg)]
    azimuth_b = azimuth_offset_deg + 360.0 * index_b / n
    full_b = torch.ones(n, device=device)
    return Cameras.from_orbit(elevation_b, azimuth_b, full_b * CAMERA_DISTANCE, full_b * CAMERA_FOV_DEG, size, size)


def interpolate_corners(rast_bxhxwx4: Tensor, corner_attrs_fx3xc: Tensor) -> Tensor:
    """Per-corner attributes (e.g. per-corner UVs) at every pixel [B, H, W, C]; 0 where empty."""
    tri_bxhxw = rast_bxhxwx4[..., 3].long() - 1
    corners_bxhxwx3xc = corner_attrs_fx3xc[tri_bxhxw.clamp(min=0)]
    u, v = rast_bxhxwx4[..., 0:1], rast_bxhxwx4[..., 1:2]
    weights_bxhxwx3x1 = torch.stack([u, v, 1.0 - u - v], dim=-2)
    return (weights_bxhxwx3x1 * corners_bxhxwx3xc).sum(dim=-2) * (tri_bxhxw >= 0)[..., None]


def render_ground_truth(
    rasterizer, verts_vx3: Tensor, faces_fx3: Tensor, uvs_fx3x2: Tensor | None, texture: np.ndarray | None, cameras: Cameras
) -> Views:
    """Mask, depth, normals and colours of the ground-truth mesh, `GT_BATCH` cameras at a time."""
    parts = []
    for first in range(0, len(cameras), GT_BATCH):
        camera = cameras[first : first + GT_BATCH]
        render = render_mesh(rasterizer, verts_vx3, faces_fx3, camera)
        hit_bxhxw = render.rast[..., 3] > 0
        if texture is not None and uvs_fx3x2 is not None:
            uv_bxhxwx2 = interpolate_corners(render.rast, uvs_fx3x2)
            rgb = torch.zeros_like(render.xyz)
            rgb[hit_bxhxw] = sample_texture(uv_bxhxwx2[hit_bxhxw], texture)
        else:
            rgb = (render.normal + 1.0) * 0.5 * hit_bxhxw[..., None]
        parts.append((rgb, hit_bxhxw[..., None].float(), render.depth, render.normal))
    rgb, mask, depth, normal = (torch.cat(column) for column in zip(*parts))
    return Views(cameras, rgb.detach(), mask, depth.detach(), normal.detach())


# 2. The stages ---------------------------------------------------------------------------------------


def build_neus(preset: QualityPreset, device: torch.device) -> NeuSField:
    """The NeuS field of the preset's size; it starts as a sphere of radius 0.5."""
    per_level_scale = math.exp(math.log(preset.neus_max_resolution / 16) / max(preset.neus_levels - 1, 1))
    grid = HashGridConfig(
        num_levels=preset.neus_levels, log2_table_size=preset.neus_log2_table, base_resolution=16,
        per_level_scale=per_level_scale, bound=SCENE_BOUND,
    )
    return NeuSField(NeuSConfig(grid=grid, sphere_radius=0.5), device)


def fit_neus(field: NeuSField, train: Views, preset: QualityPreset, generator: torch.Generator, device: torch.device, log) -> None:
    """Stage 3: fit NeuS to the training views' RGBA."""
    occupancy = OccupancyGrid(preset.occupancy_resolution, SCENE_BOUND, device, update_every=16)
    config = FitConfig(
        steps=preset.neus_steps, rays_per_step=preset.neus_rays, num_samples=preset.neus_samples,
        anneal_steps=preset.neus_steps // 5, background_rgb=BACKGROUND_RGB,
    )
    report_every = max(preset.neus_steps // 5, 1)

    def on_step(step: int, losses: dict[str, float]) -> None:
        if (step + 1) % report_every == 0:
            log(f"neus: step {step + 1}/{preset.neus_steps} " + " ".join(f"{k} {v:.4f}" for k, v in losses.items())
                + f" inv_s {field.inv_s.item():.0f} occupied {occupancy.occupied_fraction():.3f}")

    fit_to_images(field, train.cameras, train.rgba(), config, generator, occupancy, on_step)


def refine_dmtet(field: NeuSField, train: Views, preset: QualityPreset, rasterizer, generator: torch.Generator,
                 device: torch.device, log) -> DMTet:
    """Stage 4: DMTet from the NeuS SDF, refined against masks, depths and normals."""
    dmtet = DMTet.from_sdf(field, preset.dmtet_resolution, device, bound=DMTET_BOUND)
    optimizer = torch.optim.Adam([
        {"params": [dmtet.sdf], "lr": 0.1 * dmtet.grid.cell_size},
        {"params": [dmtet.deform], "lr": 1e-2},
    ])
    report_every = max(preset.dmtet_steps // 5, 1)
    for step in range(preset.dmtet_steps):
        # 1. A random batch of training views.
        pick = torch.randperm(len(train.cameras), generator=generator)[: preset.dmtet_views_per_step].to(device)
        # 2. Render the current surface there.
        verts_vx3, faces_fx3 = dmtet.extract()
        render = render_mesh(rasterizer, verts_vx3, faces_fx3, train.cameras[pick])
        gt_mask, gt_depth, gt_normal = train.mask[pick], train.depth[pick], train.normal[pick]
        both = ((render.rast[..., 3:4] > 0) & (gt_mask > 0.5)).float()
        # 3. Losses: silhouette, depth and normals where both surfaces are seen.
        loss_mask = F.mse_loss(render.mask, gt_mask)
        loss_depth = ((render.depth - gt_depth).abs() * both).sum() / both.sum().clamp(min=1.0)
        loss_normal = ((1.0 - (render.normal * gt_normal).sum(-1, keepdim=True)) * both).sum() / both.sum().clamp(min=1.0)
        loss = loss_mask + 10.0 * loss_depth + 0.2 * loss_normal
        # 4. Step.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % report_every == 0:
            log(f"dmtet: step {step + 1}/{preset.dmtet_steps} mask {loss_mask.item():.4f} depth {loss_depth.item():.4f} "
                f"normal {loss_normal.item():.4f} faces {len(faces_fx3)}")
    return dmtet


def fit_colors(verts_vx3: Tensor, faces_fx3: Tensor, train: Views, preset: QualityPreset, rasterizer,
               generator: torch.Generator, device: torch.device, log) -> ColorField:
    """Stage 5a: a colour field on the fixed surface, fitted to the training views' colours."""
    # 1. Surface points seen in each training view, and the colour the GT shows there.
    points, targets = [], []
    with torch.no_grad():
        for first in range(0, len(train.cameras), GT_BATCH):
            views = slice(first, first + GT_BATCH)
            render = render_mesh(rasterizer, verts_vx3, faces_fx3, train.cameras[views])
            both = (render.rast[..., 3] > 0) & (train.mask[views][..., 0] > 0.5)
            points.append(render.xyz[both])
            targets.append(train.rgb[views][both])
    points_nx3, target_nx3 = torch.cat(points), torch.cat(targets)
    # 2. Fit with random batches.
    config = ColorFieldConfig(num_levels=preset.color_levels, log2_hashmap_size=min(preset.neus_log2_table, 19),
                              max_resolution=max(preset.texture_size, 64), hidden_dim=64)
    color = ColorField(config, SCENE_BOUND, device)
    optimizer = torch.optim.Adam(color.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    for step in range(preset.color_steps):
        pick = torch.randint(len(points_nx3), (preset.color_batch,), generator=generator).to(device)
        loss = F.mse_loss(color(points_nx3[pick]), target_nx3[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    log(f"color: {preset.color_steps} steps on {len(points_nx3)} surface points, mse {loss.item():.5f}")
    return color


# 3. Evaluation -------------------------------------------------------------------------------------------


def render_textured(rasterizer, uv_mesh: UVMesh, texture: np.ndarray, cameras: Cameras, device: torch.device) -> tuple[Tensor, Tensor]:
    """Our textured mesh over the background: rgb [B, H, W, 3] and mask [B, H, W, 1]."""
    verts_vx3 = torch.as_tensor(uv_mesh.verts_vx3, device=device)
    faces_fx3 = torch.as_tensor(uv_mesh.faces_fx3, device=device)
    uvs_vx2 = torch.as_tensor(uv_mesh.uvs_vx2, device=device)
    background = torch.tensor(BACKGROUND_RGB, device=device)
    images, masks = [], []
    with torch.no_grad():
        for first in range(0, len(cameras), GT_BATCH):
            render = render_mesh(rasterizer, verts_vx3, faces_fx3, cameras[first : first + GT_BATCH], vertex_attrs=uvs_vx2)
            hit = render.rast[..., 3] > 0
            rgb = background.expand(*hit.shape, 3).clone()
            rgb[hit] = sample_texture(render.attrs[hit], texture)
            images.append(rgb)
            masks.append(hit[..., None].float())
    return torch.cat(images), torch.cat(masks)


def mesh_metrics(verts_vx3: Tensor, faces_fx3: Tensor, gt_vx3: Tensor, gt_fx3: Tensor, preset: QualityPreset, seed: int) -> MeshMetrics:
    """Chamfer, F-score and normal consistency of a mesh against the ground truth."""
    return chamfer_and_fscore(verts_vx3.detach(), faces_fx3, gt_vx3, gt_fx3, n_points=preset.metric_points, seed=seed,
                              device=verts_vx3.device)


def peak_memory_gb(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on CUDA, the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _synced_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# 4. The whole run --------------------------------------------------------------------------------------------


def reconstruct(options: BenchOptions) -> dict:
    """Run the seven steps; returns the result dict (also written to out_dir/result.json)."""
    device, preset, log = options.device, options.preset, options.log
    torch.manual_seed(options.seed)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    rasterizer = get_rasterizer(device)
    out_dir = options.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds: dict[str, float] = {}
    start = clock = _synced_time(device)

    def lap(name: str) -> None:
        nonlocal clock
        now = _synced_time(device)
        seconds[name] = round(now - clock, 3)
        clock = now

    # 1. Load + normalise.
    unit_vx3, center_3, scale = normalize_to_unit_box(options.mesh.verts_vx3)
    gt_vx3 = torch.as_tensor(unit_vx3, device=device)
    gt_fx3 = torch.as_tensor(options.mesh.faces_fx3, device=device)
    uvs_fx3x2 = None if options.mesh.uvs_fx3x2 is None else torch.as_tensor(options.mesh.uvs_fx3x2, device=device)
    # 2. Ground-truth views: training rings and held-out views between them.
    train_cams = ring_cameras(preset.train_views, TRAIN_ELEVATIONS_DEG, 0.0, preset.image_size, device)
    eval_cams = ring_cameras(preset.eval_views, EVAL_ELEVATIONS_DEG, 180.0 / preset.train_views + 7.0, preset.image_size, device)
    train = render_ground_truth(rasterizer, gt_vx3, gt_fx3, uvs_fx3x2, options.texture_rgb, train_cams)
    held_out = render_ground_truth(rasterizer, gt_vx3, gt_fx3, uvs_fx3x2, options.texture_rgb, eval_cams)
    lap("render_gt")
    # 3. NeuS; the sphere it starts from is measured first, for comparison.
    field = build_neus(preset, device)
    sphere_vx3, sphere_fx3 = extract_mesh_from_sdf(field.sdf, preset.dmtet_resolution, device, DMTET_BOUND)
    fit_neus(field, train, preset, generator, device, log)
    lap("neus")
    # 4. DMTet from the NeuS SDF, refined.
    with torch.no_grad():
        neus_vx3, neus_fx3 = DMTet.from_sdf(field, preset.dmtet_resolution, device, bound=DMTET_BOUND).extract()
    dmtet = refine_dmtet(field, train, preset, rasterizer, generator, device, log)
    with torch.no_grad():
        final_vx3, final_fx3 = dmtet.extract()
    lap("dmtet")
    # 5. The surface decimated to the face budget; a colour field on it, xatlas UVs, baked texture.
    decimated = decimate(final_vx3, final_fx3, preset.target_faces)
    for note in decimated.notes:
        log(f"decimate: {note}")
    result_vx3 = torch.as_tensor(decimated.verts_vx3, device=device)
    result_fx3 = torch.as_tensor(decimated.faces_fx3, device=device)
    log(f"decimate: {len(final_fx3)} -> {len(result_fx3)} faces in {decimated.seconds:.2f} s")
    lap("decimate")
    color = fit_colors(result_vx3, result_fx3, train, preset, rasterizer, generator, device, log)
    lap("color")
    uv_mesh = unwrap(result_vx3, result_fx3, texture_size=preset.texture_size)
    lap("unwrap")
    texture = bake_texture(uv_mesh, color, preset.texture_size, rasterizer, device)
    lap("bake")
    # 6. Outputs: the mesh in the input's own units, and GT | ours images of held-out views.
    out_vx3 = uv_mesh.verts_vx3 / scale + center_3
    write_glb(out_dir / "reconstruction.glb", out_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    write_obj(out_dir / "reconstruction.obj", out_vx3, uv_mesh.faces_fx3, uvs=uv_mesh.uvs_vx2, texture_rgb=texture)
    ours_rgb, ours_mask = render_textured(rasterizer, uv_mesh, texture, eval_cams, device)
    gt_rgb = held_out.on_background()
    for index in range(len(eval_cams)):
        side_by_side = torch.cat([gt_rgb[index], ours_rgb[index]], dim=1)
        (out_dir / f"compare_{index:02d}.png").write_bytes(encode_png((side_by_side * 255).round().byte().cpu().numpy()))
    lap("export")
    # 7. Metrics.
    union = ((ours_mask + held_out.mask) > 0).float()
    final = mesh_metrics(result_vx3, result_fx3, gt_vx3, gt_fx3, preset, options.seed)
    result = {
        **{k: round(v, 6) for k, v in final.as_dict().items()},
        "psnr": round(psnr(ours_rgb, gt_rgb), 3),
        "psnr_object": round(psnr(ours_rgb, gt_rgb, union), 3),
        "sphere": {k: round(v, 6) for k, v in mesh_metrics(sphere_vx3, sphere_fx3, gt_vx3, gt_fx3, preset, options.seed).as_dict().items()},
        "neus": {k: round(v, 6) for k, v in mesh_metrics(neus_vx3, neus_fx3, gt_vx3, gt_fx3, preset, options.seed).as_dict().items()},
        "full": {k: round(v, 6) for k, v in mesh_metrics(final_vx3, final_fx3, gt_vx3, gt_fx3, preset, options.seed).as_dict().items()},
        "faces": int(len(result_fx3)),
        "faces_full": int(len(final_fx3)),
    }
    lap("metrics")
    result["seconds"] = round(_synced_time(device) - start, 3)
    result["stage_seconds"] = seconds
    result["peak_mem_gb"] = round(peak_memory_gb(device), 3)
    result["device"] = str(device)
    result["rasterizer"] = type(rasterizer).__name__
    result["preset"] = asdict(preset)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result

"""The pipeline's own loss terms and render helpers (the guidance losses live in
`backend.guidance`): weighted sums, normal shading, normal consistency, view-axis depth, the
reference-view terms of any render, colour-field renders and the colour field's initial fit."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sum_losses(terms: dict[str, tuple[float, Tensor]]) -> tuple[Tensor, dict[str, float]]:
    """Σ weight·loss over the terms with a non-zero weight, and each unweighted value as a float
    (for `progress`)."""
    total: Tensor | None = None
    values: dict[str, float] = {}
    for name, (weight, loss) in terms.items():
        values[name] = float(loss.detach())
        if weight == 0:
            continue
        total = weight * loss if total is None else total + weight * loss
    if total is None:
        raise ValueError(f"sum_losses needs a term with a non-zero weight, got {list(terms)}")
    values["total"] = float(total.detach())
    return total, values


def shade_normals(render: Any, background: float = 1.0) -> Tensor:
    """A normal-shaded image [B, H, W, 3] of a mesh render: world normals mapped to colours
    ((n + 1) / 2) on a plain background, as the 2D prior sees geometry."""
    normal = render.normal
    color = (normal + 1.0) * 0.5
    return color * render.mask + background * (1.0 - render.mask)


def shade_colors(render: Any, color: Callable[[Tensor], Tensor], background: Tensor) -> Tensor:
    """[B, H, W, 3]: a colour field evaluated at a mesh render's surface points, composited over
    `background` ([3]) with the render's antialiased mask."""
    hit_bxhxw = render.rast[..., 3] > 0
    rgb = torch.zeros(*hit_bxhxw.shape, 3, device=render.xyz.device)
    if bool(hit_bxhxw.any()):
        rgb = rgb.index_put((hit_bxhxw,), color(render.xyz[hit_bxhxw]).to(rgb.dtype))
    return rgb * render.mask + background * (1.0 - render.mask)


def over_white(rgb_bxhxwx3: Tensor, opacity_bxhxwx1: Tensor, background: Tensor) -> Tensor:
    """A render composited over `background` ([3]) recomposited over white: what Zero123 was
    trained on (rgb = fg + (1 − a)·bg, so fg + (1 − a)·1 = rgb + (1 − a)·(1 − bg))."""
    return rgb_bxhxwx3 + (1.0 - opacity_bxhxwx1) * (1.0 - background.to(rgb_bxhxwx3))


def sparsity_loss(opacity_bxhxwx1: Tensor) -> Tensor:
    """mean sqrt(a² + 0.01): keeps empty space empty (threestudio's sparsity term)."""
    return (opacity_bxhxwx1 ** 2 + 0.01).sqrt().mean()


def opaque_loss(opacity_bxhxwx1: Tensor) -> Tensor:
    """Mean binary entropy of the opacity: pixels end up covered or empty, never half."""
    a = opacity_bxhxwx1.clamp(1e-3, 1.0 - 1e-3)
    return -(a * a.log() + (1.0 - a) * (1.0 - a).log()).mean()


def normal_consistency_loss(verts_vx3: Tensor, faces_fx3: Tensor) -> Tensor:
    """mean (1 − cos) between the normals of faces sharing an edge."""
    faces = faces_fx3.long()
    v0, v1, v2 = verts_vx3[faces[:, 0]], verts_vx3[faces[:, 1]], verts_vx3[faces[:, 2]]
    normals_fx3 = F.normalize(torch.linalg.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)
    # 1. Each face's three edges as sorted vertex pairs, with the face they belong to.
    edges_ex2 = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    face_of_edge_e = torch.arange(len(faces), device=faces.device).repeat(3)
    # 2. Pair up the two faces of each interior edge (equal keys lie next to each other once sorted).
    key_e = edges_ex2[:, 0] * (int(verts_vx3.shape[0]) + 1) + edges_ex2[:, 1]
    key_sorted, order = key_e.sort()
    same = key_sorted[1:] == key_sorted[:-1]
    if not bool(same.any()):
        return verts_vx3.sum() * 0.0
    first, second = face_of_edge_e[order[:-1][same]], face_of_edge_e[order[1:][same]]
    # 3. One minus the cosine between the paired normals.
    return (1.0 - (normals_fx3[first] * normals_fx3[second]).sum(dim=-1)).mean()


def world_to_camera_normals(normal_bxhxwx3: Tensor, cameras: Any) -> Tensor:
    """World-space normals [B, H, W, 3] in each camera's frame (OpenGL axes)."""
    rot_bx3x3 = cameras.c2w_bx4x4[:, :3, :3].to(normal_bxhxwx3)
    return torch.einsum("bji,bhwj->bhwi", rot_bx3x3, normal_bxhxwx3)


def view_axis_depth(depth_bxhxwx1: Tensor, opacity_bxhxwx1: Tensor, cameras: Any) -> Tensor:
    """A volume render's expected ray length (Σ w·t, not divided by opacity) as depth along each
    camera's view axis, the convention of mesh renders and of the reference losses."""
    _, dirs_bxhxwx3 = cameras.rays()
    forward_bx3 = -cameras.c2w_bx4x4[:, :3, 2]
    cos_bxhxwx1 = (dirs_bxhxwx3 * forward_bx3[:, None, None, :]).sum(-1, keepdim=True)
    return depth_bxhxwx1 / opacity_bxhxwx1.clamp_min(1e-3) * cos_bxhxwx1.to(depth_bxhxwx1)


def reference_terms(
    reference: Any,
    cameras: Any,
    rgb_bxhxwx3: Tensor | None,
    mask_bxhxwx1: Tensor,
    depth_bxhxwx1: Tensor | None = None,
    normal_bxhxwx3: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference-view losses (`backend.guidance.reference.reference_losses`) of a render at
    the reference camera: keys "rgb" (when `rgb_bxhxwx3` is given), "mask", and "depth",
    "normal" where the reference has a depth estimate. `normal_bxhxwx3` is world space."""
    from backend.guidance.reference import ReferenceRender, reference_losses

    normal_cam = None
    if normal_bxhxwx3 is not None:
        normal_cam = world_to_camera_normals(normal_bxhxwx3, cameras)
    rgb = rgb_bxhxwx3
    if rgb is None:  # a geometry render has no colours: a white stand-in, its term dropped
        rgb = torch.ones(*mask_bxhxwx1.shape[:-1], 3, device=mask_bxhxwx1.device)
    render = ReferenceRender(
        rgb_bxhxwx3=rgb,
        mask_bxhxwx1=mask_bxhxwx1,
        depth_bxhxwx1=depth_bxhxwx1,
        normal_cam_bxhxwx3=normal_cam,
        fov_deg=float(cameras.fov_deg_b[0]),
    )
    losses = reference_losses(render, reference)
    if rgb_bxhxwx3 is None:
        losses.pop("rgb", None)
    return losses


def render_colors(rasterizer: Any, surface: Any, color: Callable[[Tensor], Tensor], cameras: Any,
                  background: Tensor) -> tuple[Tensor, Any]:
    """The colour field on the fixed surface, seen from `cameras`: rgb [B, H, W, 3] and the
    mesh render (mask, depth, normals)."""
    from backend.raster import render_mesh

    render = render_mesh(rasterizer, surface.verts_vx3, surface.faces_fx3, cameras)
    return shade_colors(render, color, background), render


def fit_color_field(
    color: torch.nn.Module,
    surface: Any,
    target_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    lr: float,
    rasterizer: Any,
    generator: torch.Generator,
    device: torch.device,
    ctx: Any,
    texels: int = 256,
    batch: int = 16384,
) -> float:
    """Fit `color` to `target_fn(points_nx3, uvs_nx2) -> rgb_nx3` on the surface (at the texels of
    a `texels`² UV layout): how a refine job starts from its texture, and the texture stage from
    NeuS's colours. Returns the last MSE."""
    from backend.texture import uv_clip_coords

    faces_fx3 = surface.faces_fx3
    # 1. Surface points and their UVs behind every covered texel.
    with torch.no_grad():
        rast = rasterizer.rasterize(uv_clip_coords(surface.uvs_vx2), faces_fx3, texels, texels)
        covered = rast[0, ..., 3] > 0
        points_nx3 = rasterizer.interpolate(surface.verts_vx3[None], rast, faces_fx3)[0][covered]
        uvs_nx2 = rasterizer.interpolate(surface.uvs_vx2[None], rast, faces_fx3)[0][covered]
        if len(points_nx3) == 0:
            return 0.0
        target_nx3 = torch.cat([target_fn(points_nx3[i:i + batch], uvs_nx2[i:i + batch]).float()
                                for i in range(0, len(points_nx3), batch)]).clamp(0, 1)
    optimiser = torch.optim.Adam(color.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        # 2. One step on a random batch of texels (cancellable).
        ctx.check_cancelled()
        pick = torch.randint(len(points_nx3), (min(batch, len(points_nx3)),), generator=generator)
        pick = pick.to(device)
        loss = F.mse_loss(color(points_nx3[pick]), target_nx3[pick])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return float(loss.detach())

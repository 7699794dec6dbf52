"""Surface colour field, xatlas UVs, baking a colour function into a padded texture, texture sampling.

UV and image conventions (PROTOCOL.md section 8): UV (0, 0) is the bottom-left of the texture;
images are [H, W, 3] with row 0 at the top (as PNG stores them), so v = 1 is row 0. Texel
(row r, column c) has its centre at u = (c + 0.5) / W, v = 1 - (r + 0.5) / H: the same centres
`sample_texture` and OpenGL/glTF bilinear sampling use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.hashgrid import HashGrid, HashGridConfig

# 1. The surface colour field ---------------------------------------------------------------------


@dataclass
class ColorFieldConfig:
    """Size of the colour field's hash grid and MLP."""

    num_levels: int = 16
    """Hash-grid resolution levels."""
    features_per_level: int = 2
    """Features stored per grid vertex and level."""
    log2_hashmap_size: int = 19
    """log2 of the rows of each level's table."""
    base_resolution: int = 16
    """Cells per axis of the coarsest level."""
    max_resolution: int = 2048
    """Cells per axis of the finest level (levels grow geometrically in between)."""
    hidden_dim: int = 64
    """Width of the MLP's hidden layers."""
    num_hidden_layers: int = 2
    """Hidden layers of the MLP."""

    def grid_config(self, bound: float) -> HashGridConfig:
        """The hash-grid encoding over [-bound, bound]^3."""
        steps = max(self.num_levels - 1, 1)
        scale = math.exp(math.log(max(self.max_resolution, self.base_resolution) / self.base_resolution) / steps)
        return HashGridConfig(
            num_levels=self.num_levels,
            features_per_level=self.features_per_level,
            log2_table_size=self.log2_hashmap_size,
            base_resolution=self.base_resolution,
            per_level_scale=scale,
            bound=bound,
        )


class ColorField(nn.Module):
    """RGB in [0, 1] at world points of the scene cube: a hash-grid encoding and a small MLP.

    The texture stage and the reconstruction benchmark fit it on the mesh surface, then bake it.
    """

    def __init__(self, config: ColorFieldConfig, bound: float, device: torch.device | str) -> None:
        super().__init__()
        self.encoding = HashGrid(config.grid_config(bound), device=device)
        layers: list[nn.Module] = []
        width_in = self.encoding.output_dim
        for _ in range(config.num_hidden_layers):
            layers += [nn.Linear(width_in, config.hidden_dim, device=device), nn.ReLU()]
            width_in = config.hidden_dim
        layers.append(nn.Linear(width_in, 3, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, points_nx3: Tensor) -> Tensor:
        """RGB [N, 3] in [0, 1] at world points [N, 3] (clamped to the cube [-bound, bound]^3)."""
        return torch.sigmoid(self.mlp(self.encoding(points_nx3)))


# 2. UV unwrapping ----------------------------------------------------------------------------------


@dataclass
class UVMesh:
    """A mesh split along UV seams so each vertex has one UV (xatlas's output)."""

    verts_vx3: np.ndarray
    """Positions of the split vertices, float32 [V', 3]."""
    faces_fx3: np.ndarray
    """Triangles into the split vertices, int32 [F, 3], same order and winding as the input."""
    uvs_vx2: np.ndarray
    """One UV per split vertex, float32 [V', 2] in [0, 1], (0, 0) at the bottom-left."""
    vmapping_v: np.ndarray
    """For each split vertex, the index of the input vertex it came from, int64 [V']."""


def unwrap(
    verts_vx3: np.ndarray | Tensor,
    faces_fx3: np.ndarray | Tensor,
    texture_size: int = 1024,
    padding_texels: int = 4,
    check_cancelled: Callable[[], None] | None = None,
) -> UVMesh:
    """Charts and packs UVs with xatlas; returns the split mesh with per-vertex UVs in [0, 1].

    The charts are packed for a `texture_size`² image with about `padding_texels` empty texels
    between them (xatlas sizes its atlas near, not exactly at, `texture_size`; its UVs are
    normalised to [0, 1] either way), so bilinear filtering of the baked texture does not mix
    neighbouring charts. xatlas runs in a worker process (`backend.uvatlas.chart`):
    `check_cancelled` is polled while it runs and stops it by raising.
    """
    from backend.worker import call_stoppable, never_cancelled

    verts = _numpy(verts_vx3).astype(np.float32)
    faces = _numpy(faces_fx3).astype(np.uint32)
    if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"unwrap needs verts [V, 3] and faces [F>0, 3], got {list(verts.shape)} and {list(faces.shape)}")
    vmapping, indices, uvs = call_stoppable(
        "backend.uvatlas:chart",
        dict(verts_vx3=verts, faces_fx3=faces, texture_size=texture_size, padding_texels=padding_texels),
        check_cancelled or never_cancelled,
    )
    return UVMesh(verts_vx3=verts[vmapping], faces_fx3=indices, uvs_vx2=uvs, vmapping_v=vmapping)


def _numpy(array: np.ndarray | Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


# 3. Baking -------------------------------------------------------------------------------------------


def uv_clip_coords(uvs_vx2: Tensor) -> Tensor:
    """UVs [V, 2] -> clip coordinates [1, V, 4] that draw the UV layout over the whole image.

    Clip y = +1 is the top row, so v = 1 lands in row 0, as the texture convention wants.
    """
    xy_vx2 = uvs_vx2 * 2.0 - 1.0
    zeros_vx1 = torch.zeros_like(xy_vx2[:, :1])
    return torch.cat([xy_vx2, zeros_vx1, torch.ones_like(zeros_vx1)], dim=1)[None]


BAKE_BAND_ROWS = 128
"""Texture rows rasterised at once when baking: a cancel is checked between bands (and between
colour chunks), so it takes effect within a band's time even for large textures on a CPU."""


@torch.no_grad()
def rasterize_uv_positions(uv_mesh: UVMesh, size: int, rasterizer, device: torch.device | str,
                           check_cancelled: Callable[[], None] | None = None,
                           band_rows: int = BAKE_BAND_ROWS) -> tuple[Tensor, Tensor]:
    """Surface positions behind each texel: (xyz [size, size, 3], covered [size, size] bool).

    The UV layout is rasterised `band_rows` rows at a time, `check_cancelled` before each band:
    a band is the full layout with clip y stretched so that the band's rows fill the viewport,
    which puts every texel centre where it is in the whole image.
    """
    uvs_vx2 = torch.as_tensor(uv_mesh.uvs_vx2, dtype=torch.float32, device=device)
    verts_vx3 = torch.as_tensor(uv_mesh.verts_vx3, dtype=torch.float32, device=device)
    faces_fx3 = torch.as_tensor(uv_mesh.faces_fx3, dtype=torch.int32, device=device)
    clip_1xvx4 = uv_clip_coords(uvs_vx2)
    xyz_bands, covered_bands = [], []
    for top in range(0, size, band_rows):
        if check_cancelled is not None:
            check_cancelled()
        rows = min(band_rows, size - top)
        centre_y = 1.0 - (top + 0.5 * rows) * 2.0 / size  # clip y of the band's middle
        band_1xvx4 = clip_1xvx4.clone()
        band_1xvx4[..., 1] = (clip_1xvx4[..., 1] - centre_y) * (size / rows)
        rast_1xrxwx4 = rasterizer.rasterize(band_1xvx4, faces_fx3, rows, size)
        xyz_bands.append(rasterizer.interpolate(verts_vx3[None], rast_1xrxwx4, faces_fx3)[0])
        covered_bands.append(rast_1xrxwx4[0, ..., 3] > 0)
    return torch.cat(xyz_bands), torch.cat(covered_bands)


@torch.no_grad()
def bake_texture(
    uv_mesh: UVMesh,
    color_fn: Callable[[Tensor], Tensor],
    size: int,
    rasterizer,
    device: torch.device | str,
    padding_px: int = 8,
    chunk: int = 65536,
    check_cancelled: Callable[[], None] | None = None,
) -> np.ndarray:
    """Bake `color_fn(points_nx3) -> rgb_nx3 in [0, 1]` into a uint8 [size, size, 3] texture.

    1. rasterise the UV layout, interpolating 3D positions into every covered texel;
    2. evaluate `color_fn` there, in chunks;
    3. pad the charts outward by `padding_px` texels (iterative dilation) so bilinear filtering
       and mipmaps do not pull in background, then fill what is left with the mean colour.

    `check_cancelled` is called between raster bands and colour chunks, and stops the bake by
    raising.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    xyz_hxwx3, covered_hxw = rasterize_uv_positions(uv_mesh, size, rasterizer, device, check_cancelled)
    rgb_hxwx3 = torch.zeros(size, size, 3, dtype=torch.float32, device=device)
    points_nx3 = xyz_hxwx3[covered_hxw]
    colors = []
    for start in range(0, len(points_nx3), chunk):
        if check_cancelled is not None:
            check_cancelled()
        colors.append(color_fn(points_nx3[start : start + chunk]).float())
    if colors:
        rgb_hxwx3[covered_hxw] = torch.cat(colors).clamp(0.0, 1.0)
    rgb_hxwx3 = pad_charts(rgb_hxwx3, covered_hxw, padding_px)
    return (rgb_hxwx3 * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def pad_charts(rgb_hxwx3: Tensor, filled_hxw: Tensor, padding_px: int) -> Tensor:
    """Grow filled texels outward `padding_px` times (each new texel = mean of its filled
    8-neighbours), then set the still-empty ones to the mean filled colour."""
    rgb_1x3xhxw = (rgb_hxwx3 * filled_hxw[..., None]).permute(2, 0, 1)[None].clone()
    filled_1x1xhxw = filled_hxw[None, None].to(rgb_hxwx3.dtype)
    kernel_3x1x3x3 = torch.ones(3, 1, 3, 3, dtype=rgb_hxwx3.dtype, device=rgb_hxwx3.device)
    for _ in range(padding_px):
        summed = F.conv2d(rgb_1x3xhxw * filled_1x1xhxw, kernel_3x1x3x3, padding=1, groups=3)
        count = F.conv2d(filled_1x1xhxw, kernel_3x1x3x3[:1], padding=1)
        grow = (filled_1x1xhxw == 0) & (count > 0)
        if not grow.any():
            break
        rgb_1x3xhxw = torch.where(grow, summed / count.clamp(min=1.0), rgb_1x3xhxw)
        filled_1x1xhxw = filled_1x1xhxw + grow.to(filled_1x1xhxw.dtype)
    if filled_1x1xhxw.sum() > 0:
        mean_1x3x1x1 = (rgb_1x3xhxw * filled_1x1xhxw).sum(dim=(2, 3), keepdim=True) / filled_1x1xhxw.sum()
        rgb_1x3xhxw = torch.where(filled_1x1xhxw > 0, rgb_1x3xhxw, mean_1x3x1x1)
    return rgb_1x3xhxw[0].permute(1, 2, 0)


# 4. Sampling a texture ---------------------------------------------------------------------------------


def texture_tensor(image_hxwx3: np.ndarray | Tensor, device: torch.device | str) -> Tensor:
    """A texture as float32 [H, W, 3] in [0, 1] on `device` (uint8 images are divided by 255)."""
    image = torch.as_tensor(np.asarray(image_hxwx3) if not isinstance(image_hxwx3, Tensor) else image_hxwx3)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"texture image must be [H, W, 3], got {list(image.shape)}")
    image = image[..., :3].to(device)
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def sample_texture(uvs_nx2: Tensor, image_hxwx3: np.ndarray | Tensor) -> Tensor:
    """Bilinear colours [N, 3] in [0, 1] at UVs [N, 2] (bottom-left origin, clamped at the edges)."""
    texture_hxwx3 = texture_tensor(image_hxwx3, uvs_nx2.device)
    grid_1x1xnx2 = torch.stack([uvs_nx2[:, 0] * 2.0 - 1.0, 1.0 - uvs_nx2[:, 1] * 2.0], dim=-1)[None, None]
    sampled_1x3x1xn = F.grid_sample(
        texture_hxwx3.permute(2, 0, 1)[None],
        grid_1x1xnx2.float(),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled_1x3x1xn[0, :, 0].T

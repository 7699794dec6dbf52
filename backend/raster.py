"""Triangle rasterisation with nvdiffrast's semantics: a plain-PyTorch twin and nvdiffrast itself.

Conventions shared by both implementations (see docs/mesh_rendering.md):

- `clip_bxvx4`: vertex positions in OpenGL clip space, float32; `faces_fx3`: int32 vertex ids.
- `rasterize` returns `rast_bxhxwx4` = (u, v, z/w, triangle_id + 1), 0 everywhere for an empty
  pixel. (u, v) are perspective-correct barycentrics: a point is u·v0 + v·v1 + (1 − u − v)·v2.
- Images are `[B, H, W, C]` with **row 0 at the top**. Pixel (row r, column c) has its centre at
  NDC x = (2c + 1)/W − 1, y = 1 − (2r + 1)/H. nvdiffrast writes bottom-up; its output is flipped
  once inside `NvdiffrastRasterizer.rasterize` (and flipped back around `antialias`).
- Barycentrics are differentiable w.r.t. the clip-space positions; `interpolate` is
  differentiable w.r.t. the attributes and the barycentrics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from backend.nvdiffrast_loader import (
    INSTALL_HINT,
    NvdiffrastUnavailable,
    load_nvdiffrast,
    nvdiffrast_installed,
)

RASTERIZER_ENV = "DREAMLOOM_RASTERIZER"
"""Environment variable choosing the rasteriser: `auto` (default), `torch` or `nvdiffrast`."""


class Rasterizer(Protocol):
    """The rasteriser interface every renderer and the texture baker use."""

    def rasterize(self, clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> Tensor:
        """[B, H, W, 4] = (u, v, z/w, triangle_id + 1), row 0 at the top."""
        ...

    def interpolate(self, attr: Tensor, rast_bxhxwx4: Tensor, faces_fx3: Tensor) -> Tensor:
        """Per-vertex attributes [V, C] or [B, V, C] interpolated to [B, H, W, C]; 0 where empty."""
        ...

    def antialias(
        self, color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, clip_bxvx4: Tensor, faces_fx3: Tensor
    ) -> Tensor:
        """Silhouette antialiasing of an image rendered from `rast`."""
        ...


# ----------------------------------------------------------------------------------------------
# Input validation shared by both implementations.


def _check_inputs(clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> None:
    if not isinstance(clip_bxvx4, Tensor) or clip_bxvx4.dim() != 3 or clip_bxvx4.shape[-1] != 4:
        shape = tuple(clip_bxvx4.shape) if isinstance(clip_bxvx4, Tensor) else type(clip_bxvx4)
        raise ValueError(f"clip_bxvx4 must be a [B, V, 4] tensor, got {shape}")
    if not clip_bxvx4.is_floating_point():
        raise ValueError(f"clip_bxvx4 must be floating point, got dtype {clip_bxvx4.dtype}")
    if not isinstance(faces_fx3, Tensor) or faces_fx3.dim() != 2 or faces_fx3.shape[-1] != 3:
        shape = tuple(faces_fx3.shape) if isinstance(faces_fx3, Tensor) else type(faces_fx3)
        raise ValueError(f"faces_fx3 must be an [F, 3] tensor, got {shape}")
    if faces_fx3.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces_fx3 must be int32 (or int64), got dtype {faces_fx3.dtype}")
    if faces_fx3.device != clip_bxvx4.device:
        raise ValueError(
            f"faces_fx3 is on {faces_fx3.device} but clip_bxvx4 is on {clip_bxvx4.device}"
        )
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if faces_fx3.numel() > 0:
        low, high = int(faces_fx3.min()), int(faces_fx3.max())
        if low < 0 or high >= clip_bxvx4.shape[1]:
            raise ValueError(
                f"faces_fx3 holds vertex ids in [{low}, {high}] but clip_bxvx4 has "
                f"{clip_bxvx4.shape[1]} vertices"
            )


def _check_rast(rast_bxhxwx4: Tensor) -> None:
    if not isinstance(rast_bxhxwx4, Tensor) or rast_bxhxwx4.dim() != 4 or rast_bxhxwx4.shape[-1] != 4:
        shape = tuple(rast_bxhxwx4.shape) if isinstance(rast_bxhxwx4, Tensor) else type(rast_bxhxwx4)
        raise ValueError(f"rast must be a [B, H, W, 4] tensor from rasterize(), got {shape}")


def _attr_batched(attr: Tensor, batch: int) -> Tensor:
    """[V, C] or [1|B, V, C] -> [B, V, C] (a view, no copy)."""
    if attr.dim() == 2:
        return attr.unsqueeze(0).expand(batch, -1, -1)
    if attr.dim() == 3 and attr.shape[0] in (1, batch):
        return attr.expand(batch, -1, -1)
    raise ValueError(f"attr must be [V, C] or [B={batch}, V, C], got {tuple(attr.shape)}")


# ----------------------------------------------------------------------------------------------
# The plain-PyTorch twin.


def _edge_coefficients(tri_xyw_nx3x3: Tensor) -> tuple[Tensor, Tensor]:
    """2D-homogeneous edge functions of triangles given by their (x, y, w) clip coordinates.

    Edge function i of a triangle is E_i(p) = (v_j × v_k) · (x, y, 1) for (i, j, k) cyclic, with
    v = (x, y, w). At the pixel with NDC (x, y), the perspective-correct barycentrics are
    E_i / ΣE and the clip-space w of the surface point is det / ΣE, det = v_0 · (v_1 × v_2).
    Returns coefficients [N, 3 edges, 3 (a, b, c)] and det [N].
    """
    v0, v1, v2 = tri_xyw_nx3x3.unbind(dim=1)
    coeff_nx3x3 = torch.stack(
        [torch.linalg.cross(v1, v2), torch.linalg.cross(v2, v0), torch.linalg.cross(v0, v1)], dim=1
    )
    det_n = (v0 * coeff_nx3x3[:, 0]).sum(-1)
    return coeff_nx3x3, det_n


def _pixel_ndc(px: Tensor, py: Tensor, height: int, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """NDC of pixel centres for column px and row py (row 0 at the top)."""
    x = (2.0 * px.to(dtype) + 1.0) / width - 1.0
    y = 1.0 - (2.0 * py.to(dtype) + 1.0) / height
    return x, y


@dataclass
class _TriangleSetup:
    """Per-triangle data for the visibility pass, flattened over the batch (n = B·F)."""

    coeff_nx3x3: Tensor
    """Edge-function coefficients (a, b, c) of the three edges, each computed from its two
    vertices in ascending vertex-id order so that a shared edge gets bit-identical coefficients
    in both triangles (floating-point cross products are not exactly antisymmetric)."""
    orient_nx3: Tensor
    """±1 per edge: the edge's sign in this triangle times the sign of the triangle's determinant,
    so that orient·E >= 0 inside."""
    z_nx3: Tensor
    """Clip-space z of the three vertices."""
    w_nx3: Tensor
    """Clip-space w of the three vertices."""
    col0_n: Tensor
    """First column of the pixel bounding box (inclusive)."""
    row0_n: Tensor
    """First row of the pixel bounding box (inclusive)."""
    cols_n: Tensor
    """Number of columns in the bounding box (0 for a culled triangle)."""
    rows_n: Tensor
    """Number of rows in the bounding box (0 for a culled triangle)."""


def _canonical_edges(xyw_nx3x3: Tensor, faces_nx3: Tensor) -> tuple[Tensor, Tensor]:
    """Edge coefficients [n, 3, 3] from vertices in ascending id order, and each edge's sign [n, 3]."""
    j, k = [1, 2, 0], [2, 0, 1]
    swap_nx3 = faces_nx3[:, j] > faces_nx3[:, k]
    first = torch.where(swap_nx3.unsqueeze(-1), xyw_nx3x3[:, k], xyw_nx3x3[:, j])
    second = torch.where(swap_nx3.unsqueeze(-1), xyw_nx3x3[:, j], xyw_nx3x3[:, k])
    sign_nx3 = 1.0 - 2.0 * swap_nx3.to(xyw_nx3x3.dtype)
    return torch.linalg.cross(first, second), sign_nx3


def _setup_triangles(clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> _TriangleSetup:
    """Edge functions, frustum culling and conservative pixel bounding boxes (no gradient)."""
    batch, num_faces = clip_bxvx4.shape[0], faces_fx3.shape[0]
    faces_nx3 = faces_fx3.long().repeat(batch, 1)
    tri_nx3x4 = clip_bxvx4[:, faces_fx3.long()].reshape(batch * num_faces, 3, 4)
    x, y, z, w = tri_nx3x4.unbind(-1)
    xyw = torch.stack([x, y, w], dim=-1)
    coeff, edge_sign = _canonical_edges(xyw, faces_nx3)
    det = (xyw[:, 0] * coeff[:, 0]).sum(-1) * edge_sign[:, 0]
    orient = edge_sign * torch.sign(det).unsqueeze(-1)
    # 1. Cull: all three vertices outside one clip plane, or a degenerate (x, y, w) matrix.
    outside = torch.zeros_like(det, dtype=torch.bool)
    for coord in (x, y, z):
        outside |= (coord > w).all(-1) | (coord < -w).all(-1)
    outside |= (w <= 0).all(-1) | (det == 0)
    # 2. Screen bounding box for triangles fully in front; the whole image when one vertex has
    #    w <= 0 (its projection wraps around). One pixel of margin: the exact test decides.
    in_front = (w > 1e-12).all(-1)
    safe_w = torch.where(in_front.unsqueeze(-1), w, torch.ones_like(w))
    ndc_x, ndc_y = x / safe_w, y / safe_w
    col0 = torch.ceil((ndc_x.amin(-1) + 1) * width / 2 - 0.5) - 1
    col1 = torch.floor((ndc_x.amax(-1) + 1) * width / 2 - 0.5) + 1
    row0 = torch.ceil((1 - ndc_y.amax(-1)) * height / 2 - 0.5) - 1
    row1 = torch.floor((1 - ndc_y.amin(-1)) * height / 2 - 0.5) + 1
    col0 = torch.where(in_front, col0.clamp(0, width), torch.zeros_like(col0)).long()
    col1 = torch.where(in_front, col1.clamp(-1, width - 1), torch.full_like(col1, width - 1)).long()
    row0 = torch.where(in_front, row0.clamp(0, height), torch.zeros_like(row0)).long()
    row1 = torch.where(in_front, row1.clamp(-1, height - 1), torch.full_like(row1, height - 1)).long()
    cols = (col1 - col0 + 1).clamp(min=0) * (~outside)
    rows = (row1 - row0 + 1).clamp(min=0) * (~outside)
    return _TriangleSetup(coeff, orient, z, w, col0, row0, cols, rows)


def _covered(edge_px3: Tensor, coeff_px3x3: Tensor, orient_px3: Tensor) -> Tensor:
    """Coverage with the top-left rule, from canonical edge values and their orientation.

    A pixel centre strictly inside every edge is covered. One lying exactly on an edge belongs to
    the triangle whose inside is to the right of the edge (a "left" edge) or, for a horizontal
    edge, below it in the image (a "top" edge): of two triangles sharing an edge exactly one
    takes the pixel, because their oriented coefficients are exact negatives.
    """
    oriented = edge_px3 * orient_px3
    a = coeff_px3x3[..., 0] * orient_px3
    b = coeff_px3x3[..., 1] * orient_px3
    owns_tie = (a > 0) | ((a == 0) & (b < 0))
    inside = (oriented > 0) | ((oriented == 0) & owns_tie)
    return inside.all(-1) & (oriented.sum(-1) > 0)


class TorchRasterizer:
    """Rasteriser in plain PyTorch (CPU or CUDA) with nvdiffrast's outputs.

    Rules: coverage is tested exactly at pixel centres with 2D-homogeneous edge functions (no
    division by w, so triangles crossing the camera plane are handled), top-left fill rule, no
    back-face culling. Fragments are kept when 0 < w and −1 <= z/w <= 1, i.e. the triangle is
    clipped against the near and far planes per pixel. Nearest z/w wins; exact depth ties go to
    the lower triangle id. Visibility is decided without gradient; the chosen triangle's
    barycentrics are then recomputed differentiably from its clip-space vertices.
    `antialias` blends across silhouette edges analytically (`silhouette_antialias`), which gives
    silhouette gradients like nvdiffrast's.
    """

    def __init__(self, pairs_per_chunk: int = 1 << 21) -> None:
        if pairs_per_chunk <= 0:
            raise ValueError(f"pairs_per_chunk must be positive, got {pairs_per_chunk}")
        self.pairs_per_chunk = pairs_per_chunk
        """Upper bound on (triangle, pixel) candidate pairs tested at once: bounds memory
        (about 200 bytes per pair, so the default 2M pairs is ~0.4 GB peak)."""

    # -- visibility ------------------------------------------------------------------------

    def _chunks(self, pairs_n: Tensor) -> list[tuple[int, int]]:
        """Split triangles into consecutive runs of at most `pairs_per_chunk` candidate pairs."""
        ends = torch.cumsum(pairs_n, 0)
        total = int(ends[-1]) if ends.numel() else 0
        chunks, start, done = [], 0, 0
        while done < total:
            stop = int(torch.searchsorted(ends, done + self.pairs_per_chunk, right=True))
            stop = max(stop, start + 1)
            chunks.append((start, stop))
            done = int(ends[stop - 1])
            start = stop
        return chunks

    @torch.no_grad()
    def _visible_triangles(self, clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> Tensor:
        """Index (b·F + f) of the nearest covering triangle per pixel, −1 where empty: [B·H·W]."""
        batch, num_faces = clip_bxvx4.shape[0], faces_fx3.shape[0]
        device, dtype = clip_bxvx4.device, clip_bxvx4.dtype
        setup = _setup_triangles(clip_bxvx4, faces_fx3, height, width)
        depth_buffer = torch.full((batch * height * width,), math.inf, device=device, dtype=dtype)
        id_buffer = torch.full((batch * height * width,), -1, device=device, dtype=torch.long)
        pairs_n = setup.cols_n * setup.rows_n
        for start, stop in self._chunks(pairs_n):
            # 1. Enumerate (triangle, pixel) pairs inside each triangle's bounding box.
            tri_ids = torch.arange(start, stop, device=device)
            counts = pairs_n[start:stop]
            tri_p = torch.repeat_interleave(tri_ids, counts)
            first = torch.cumsum(counts, 0) - counts
            local = torch.arange(tri_p.shape[0], device=device) - torch.repeat_interleave(first, counts)
            cols = setup.cols_n[tri_p]
            px = setup.col0_n[tri_p] + local % cols
            py = setup.row0_n[tri_p] + local // cols
            # 2. Exact coverage and depth at the pixel centre.
            x, y = _pixel_ndc(px, py, height, width, dtype)
            coeff = setup.coeff_nx3x3[tri_p]
            edge = coeff[..., 0] * x.unsqueeze(-1) + coeff[..., 1] * y.unsqueeze(-1) + coeff[..., 2]
            orient = setup.orient_nx3[tri_p]
            covered = _covered(edge, coeff, orient)
            oriented = edge * orient
            denom = (oriented * setup.w_nx3[tri_p]).sum(-1)
            z_over_w = (oriented * setup.z_nx3[tri_p]).sum(-1) / torch.where(denom == 0, 1.0, denom)
            keep = covered & (z_over_w >= -1) & (z_over_w <= 1)
            tri_p, z_over_w = tri_p[keep], z_over_w[keep]
            pixel = (tri_p // num_faces) * (height * width) + py[keep] * width + px[keep]
            # 3. Z-buffer: nearest depth, then the lowest triangle id among exact ties.
            new_depth = depth_buffer.scatter_reduce(0, pixel, z_over_w, reduce="amin", include_self=True)
            unset = torch.full_like(id_buffer, torch.iinfo(torch.long).max)
            id_buffer = torch.where(new_depth < depth_buffer, unset, id_buffer)
            winners = z_over_w == new_depth[pixel]
            id_buffer = id_buffer.scatter_reduce(0, pixel[winners], tri_p[winners], reduce="amin", include_self=True)
            depth_buffer = new_depth
        return id_buffer

    # -- the interface ---------------------------------------------------------------------

    def rasterize(self, clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> Tensor:
        """[B, H, W, 4] = (u, v, z/w, triangle_id + 1), row 0 at the top, differentiable in clip."""
        _check_inputs(clip_bxvx4, faces_fx3, height, width)
        batch, num_faces = clip_bxvx4.shape[0], faces_fx3.shape[0]
        rast = torch.zeros(batch * height * width, 4, device=clip_bxvx4.device, dtype=clip_bxvx4.dtype)
        if num_faces == 0:
            return rast.reshape(batch, height, width, 4)
        # 1. Which triangle is visible at each pixel (no gradient).
        visible = self._visible_triangles(clip_bxvx4.detach(), faces_fx3, height, width)
        pixel = torch.nonzero(visible >= 0).squeeze(-1)
        tri = visible[pixel]
        b, f = tri // num_faces, tri % num_faces
        # 2. Differentiable perspective-correct barycentrics of that triangle at the pixel centre.
        tri_px3x4 = clip_bxvx4[b.unsqueeze(-1), faces_fx3.long()[f]]
        xyw = tri_px3x4[..., [0, 1, 3]]
        coeff, _ = _edge_coefficients(xyw)
        rem = pixel % (height * width)
        x, y = _pixel_ndc(rem % width, rem // width, height, width, clip_bxvx4.dtype)
        edge = coeff[..., 0] * x.unsqueeze(-1) + coeff[..., 1] * y.unsqueeze(-1) + coeff[..., 2]
        bary = edge / edge.sum(-1, keepdim=True)
        z_over_w = (bary * tri_px3x4[..., 2]).sum(-1) / (bary * tri_px3x4[..., 3]).sum(-1)
        values = torch.stack([bary[:, 0], bary[:, 1], z_over_w, (f + 1).to(rast.dtype)], dim=-1)
        rast = rast.index_put((pixel,), values)
        return rast.reshape(batch, height, width, 4)

    def interpolate(self, attr: Tensor, rast_bxhxwx4: Tensor, faces_fx3: Tensor) -> Tensor:
        """Per-vertex attributes [V, C] or [B, V, C] -> [B, H, W, C]; 0 where no triangle."""
        _check_rast(rast_bxhxwx4)
        batch = rast_bxhxwx4.shape[0]
        attr_bxvxc = _attr_batched(attr, batch)
        if faces_fx3.shape[0] == 0:
            return attr_bxvxc.new_zeros(*rast_bxhxwx4.shape[:3], attr_bxvxc.shape[-1])
        tri_id = rast_bxhxwx4[..., 3].long() - 1
        valid = tri_id >= 0
        corner_ids = faces_fx3.long()[tri_id.clamp(min=0)]  # [B, H, W, 3]
        batch_ids = torch.arange(batch, device=attr.device).view(batch, 1, 1, 1)
        corners = attr_bxvxc[batch_ids, corner_ids]  # [B, H, W, 3, C]
        u, v = rast_bxhxwx4[..., 0], rast_bxhxwx4[..., 1]
        weights = torch.stack([u, v, 1 - u - v], dim=-1).unsqueeze(-1)
        return (weights * corners).sum(-2) * valid.unsqueeze(-1).to(attr.dtype)

    def antialias(
        self, color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, clip_bxvx4: Tensor, faces_fx3: Tensor
    ) -> Tensor:
        """Analytic silhouette antialiasing in nvdiffrast's manner (see `silhouette_antialias`):
        colours are blended across silhouette edges and gradients reach the vertex positions."""
        _check_rast(rast_bxhxwx4)
        _check_inputs(clip_bxvx4, faces_fx3, rast_bxhxwx4.shape[1], rast_bxhxwx4.shape[2])
        return silhouette_antialias(color_bxhxwxc, rast_bxhxwx4, clip_bxvx4, faces_fx3)


def edge_neighbours(faces_fx3: Tensor) -> Tensor:
    """[F, 3] the face across edge i (the edge opposite corner i) of each face, −1 when the edge
    has no partner or more than one (open boundary or non-manifold: treated as silhouettes)."""
    faces = faces_fx3.long()
    num_faces = faces.shape[0]
    first, second = faces[:, [1, 2, 0]], faces[:, [2, 0, 1]]
    num_verts = int(faces.max()) + 1 if num_faces else 1
    keys = (torch.minimum(first, second) * num_verts + torch.maximum(first, second)).reshape(-1)
    _, group, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    order = torch.argsort(group, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(keys.shape[0], device=keys.device)
    offset_in_group = position - starts[group[order]]
    partner = torch.where(offset_in_group == 0, position + 1, position - 1).clamp(0, keys.shape[0] - 1)
    paired = counts[group[order]] == 2
    neighbours = torch.full_like(keys, -1)
    neighbours[order[paired]] = order[partner[paired]] // 3
    return neighbours.reshape(num_faces, 3)


def _adjacent_pixel_pairs(batch: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices (p, q) of every horizontally and vertically adjacent pixel pair, and whether
    the pair is horizontal."""
    pixel = torch.arange(batch * height * width, device=device).reshape(batch, height, width)
    horizontal_p, horizontal_q = pixel[:, :, :-1].reshape(-1), pixel[:, :, 1:].reshape(-1)
    vertical_p, vertical_q = pixel[:, :-1, :].reshape(-1), pixel[:, 1:, :].reshape(-1)
    is_horizontal = torch.cat(
        [torch.ones_like(horizontal_p, dtype=torch.bool), torch.zeros_like(vertical_p, dtype=torch.bool)]
    )
    return torch.cat([horizontal_p, vertical_p]), torch.cat([horizontal_q, vertical_q]), is_horizontal


def silhouette_antialias(color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, clip_bxvx4: Tensor, faces_fx3: Tensor) -> Tensor:
    """Blend colours across silhouette edges, differentiably w.r.t. colours and vertex positions.

    For each pair of adjacent pixels showing different triangles (or one empty), the pixel whose
    triangle is nearer is the front one. If the segment between the two pixel centres leaves the
    front triangle through a silhouette edge (no neighbouring face across it, or the neighbour
    faces the other way on screen) that is closer to perpendicular to the segment than to
    parallel, the crossing sits at fraction t from the front centre. Past
    the midpoint (t > 0.5) the back pixel takes (t − 0.5) of the front colour; before it, the
    front pixel takes (0.5 − t) of the back colour. t comes from the triangle's edge function,
    so it moves with the vertices: this is where silhouette gradients come from.
    """
    batch, height, width, channels = color_bxhxwxc.shape
    if faces_fx3.shape[0] == 0:
        return color_bxhxwxc
    device = color_bxhxwxc.device
    faces = faces_fx3.long()
    tri_id = rast_bxhxwx4[..., 3].detach().long().reshape(-1) - 1
    z_over_w = rast_bxhxwx4[..., 2].detach().reshape(-1)
    color = color_bxhxwxc.reshape(-1, channels)
    # 1. Pixel pairs across a change of triangle; the front one is nearer (or the only one).
    p, q, is_horizontal = _adjacent_pixel_pairs(batch, height, width, device)
    differ = tri_id[p] != tri_id[q]
    p, q, is_horizontal = p[differ], q[differ], is_horizontal[differ]
    p_front = (tri_id[q] < 0) | ((tri_id[p] >= 0) & (z_over_w[p] <= z_over_w[q]))
    front, back = torch.where(p_front, p, q), torch.where(p_front, q, p)
    face = tri_id[front]
    view = front // (height * width)
    # 2. The front triangle's edge functions at both pixel centres (differentiable).
    tri_xyw = clip_bxvx4[view.unsqueeze(-1), faces[face]][..., [0, 1, 3]]
    coeff, det = _edge_coefficients(tri_xyw)
    sign = torch.sign(det).detach().unsqueeze(-1)

    def edge_values(pixel: Tensor) -> Tensor:
        rem = pixel % (height * width)
        x, y = _pixel_ndc(rem % width, rem // width, height, width, clip_bxvx4.dtype)
        return sign * (coeff[..., 0] * x.unsqueeze(-1) + coeff[..., 1] * y.unsqueeze(-1) + coeff[..., 2])

    e_front, e_back = edge_values(front), edge_values(back)
    # 3. The edge the segment leaves through: the first crossing among the edges it exits.
    with torch.no_grad():
        exits = (e_front >= 0) & (e_back < 0)
        t_all = torch.where(exits, e_front / torch.where(exits, e_front - e_back, 1.0), torch.inf)
        edge = t_all.argmin(-1)
        neighbour = edge_neighbours(faces)[face, edge]
        all_xyw = clip_bxvx4.detach()[:, faces][..., [0, 1, 3]]  # [B, F, 3, 3]
        face_sign = torch.sign(torch.linalg.det(all_xyw))
        neighbour_sign = face_sign[view, neighbour.clamp(min=0)]
        silhouette = exits.any(-1) & ((neighbour < 0) | (neighbour_sign != sign.squeeze(-1)))
        # An edge is handled by the pairs across it along the axis nearer its normal: steep
        # edges by horizontal pairs, flat ones by vertical pairs (no double counting).
        normal = coeff.detach().gather(1, edge[:, None, None].expand(-1, 1, 3)).squeeze(1)
        steep = normal[:, 0].abs() * height > normal[:, 1].abs() * width
        silhouette &= steep == is_horizontal
    keep = torch.nonzero(silhouette).squeeze(-1)
    front, back, edge = front[keep], back[keep], edge[keep]
    ef = e_front[keep].gather(1, edge[:, None]).squeeze(-1)
    eb = e_back[keep].gather(1, edge[:, None]).squeeze(-1)
    t = (ef / (ef - eb)).unsqueeze(-1)
    # 4. Blend: the back pixel gains front colour past the midpoint, the front pixel loses some
    #    to the back colour before it.
    towards_front = (color[front] - color[back]) * (t - 0.5).clamp(min=0)
    towards_back = (color[back] - color[front]) * (0.5 - t).clamp(min=0)
    out = color.index_add(0, back, towards_front).index_add(0, front, towards_back)
    return out.reshape(batch, height, width, channels)


# ----------------------------------------------------------------------------------------------
# nvdiffrast.


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasteriser (`RasterizeCudaContext`, no OpenGL), loaded on first use."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        """The CUDA device the context lives on."""
        if self.device.type != "cuda":
            raise ValueError(f"NvdiffrastRasterizer needs a CUDA device, got device={self.device}")
        self._context = None

    def _dr(self):
        return load_nvdiffrast()

    def _ctx(self):
        if self._context is None:
            self._context = self._dr().RasterizeCudaContext(device=self.device)
        return self._context

    def rasterize(self, clip_bxvx4: Tensor, faces_fx3: Tensor, height: int, width: int) -> Tensor:
        """[B, H, W, 4] = (u, v, z/w, triangle_id + 1), flipped to row 0 at the top."""
        _check_inputs(clip_bxvx4, faces_fx3, height, width)
        rast_bottom_up, _ = self._dr().rasterize(
            self._ctx(),
            clip_bxvx4.float().contiguous(),
            faces_fx3.to(torch.int32).contiguous(),
            resolution=(height, width),
        )
        return rast_bottom_up.flip(1)

    def interpolate(self, attr: Tensor, rast_bxhxwx4: Tensor, faces_fx3: Tensor) -> Tensor:
        """Per-vertex attributes [V, C] or [B, V, C] -> [B, H, W, C] (per pixel: no flip needed)."""
        _check_rast(rast_bxhxwx4)
        if attr.dim() == 3 and attr.shape[0] not in (1, rast_bxhxwx4.shape[0]):
            raise ValueError(f"attr must be [V, C] or [B={rast_bxhxwx4.shape[0]}, V, C], got {tuple(attr.shape)}")
        attr_bxvxc = attr.unsqueeze(0) if attr.dim() == 2 else attr  # broadcast over the batch
        out, _ = self._dr().interpolate(
            attr_bxvxc.float().contiguous(), rast_bxhxwx4.contiguous(), faces_fx3.to(torch.int32).contiguous()
        )
        return out

    def antialias(
        self, color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, clip_bxvx4: Tensor, faces_fx3: Tensor
    ) -> Tensor:
        """nvdiffrast's analytic antialiasing (gradients to vertex positions at silhouettes)."""
        _check_rast(rast_bxhxwx4)
        out_bottom_up = self._dr().antialias(
            color_bxhxwxc.flip(1).contiguous(),
            rast_bxhxwx4.flip(1).contiguous(),
            clip_bxvx4.float().contiguous(),
            faces_fx3.to(torch.int32).contiguous(),
        )
        return out_bottom_up.flip(1)


def get_rasterizer(device: torch.device | str, kind: str | None = None) -> Rasterizer:
    """The rasteriser for `device`.

    kind: "auto" (default: nvdiffrast on CUDA when installed, the PyTorch twin otherwise),
    "torch" or "nvdiffrast". When None, the DREAMLOOM_RASTERIZER environment variable decides.
    nvdiffrast is only imported (and compiled) on the first rasterize call.
    """
    kind = kind if kind is not None else os.environ.get(RASTERIZER_ENV, "auto")
    device = torch.device(device)
    if kind not in ("auto", "torch", "nvdiffrast"):
        raise ValueError(
            f"rasteriser kind must be 'auto', 'torch' or 'nvdiffrast', got {kind!r} "
            f"(argument kind or ${RASTERIZER_ENV})"
        )
    if kind == "torch":
        return TorchRasterizer()
    if kind == "nvdiffrast":
        if device.type != "cuda":
            raise ValueError(f"rasteriser kind 'nvdiffrast' needs a CUDA device, got device={device}")
        if not nvdiffrast_installed():
            raise NvdiffrastUnavailable(INSTALL_HINT)
        return NvdiffrastRasterizer(device)
    if device.type == "cuda" and nvdiffrast_installed():
        return NvdiffrastRasterizer(device)
    return TorchRasterizer()


# ----------------------------------------------------------------------------------------------
# Rendering a mesh.


@dataclass
class MeshRender:
    """Per-pixel buffers of a rendered mesh, all [B, H, W, C] with row 0 at the top."""

    mask: Tensor
    """[B, H, W, 1] coverage in [0, 1], antialiased at silhouettes (differentiable w.r.t. the
    vertex positions there); `rast[..., 3] > 0` is the binary coverage."""
    depth: Tensor
    """[B, H, W, 1] distance along each camera's view axis (not the ray length); 0 where empty."""
    normal: Tensor
    """[B, H, W, 3] world-space unit normals (interpolated vertex normals, or face normals when
    `smooth_normals=False`); 0 where empty."""
    xyz: Tensor
    """[B, H, W, 3] world-space surface positions; 0 where empty."""
    rast: Tensor
    """[B, H, W, 4] the rasteriser output (u, v, z/w, triangle_id + 1)."""
    attrs: Tensor | None
    """[B, H, W, C] interpolated `vertex_attrs`, or None when none were given."""


def vertex_normals(verts_vx3: Tensor, faces_fx3: Tensor) -> Tensor:
    """Area-weighted unit vertex normals [V, 3] of a counter-clockwise mesh (differentiable)."""
    faces = faces_fx3.long()
    v0, v1, v2 = verts_vx3[faces[:, 0]], verts_vx3[faces[:, 1]], verts_vx3[faces[:, 2]]
    face_normals_fx3 = torch.linalg.cross(v1 - v0, v2 - v0)  # length = 2 × area
    normals = torch.zeros_like(verts_vx3)
    for corner in range(3):
        normals = normals.index_add(0, faces[:, corner], face_normals_fx3)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def face_normals(verts_vx3: Tensor, faces_fx3: Tensor) -> Tensor:
    """Unit face normals [F, 3] of a counter-clockwise mesh (differentiable)."""
    faces = faces_fx3.long()
    v0, v1, v2 = verts_vx3[faces[:, 0]], verts_vx3[faces[:, 1]], verts_vx3[faces[:, 2]]
    return torch.nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0), dim=-1, eps=1e-12)


def render_mesh(
    rasterizer: Rasterizer,
    verts_vx3: Tensor,
    faces_fx3: Tensor,
    cameras,
    vertex_attrs: Tensor | None = None,
    near: float = 0.1,
    far: float = 100.0,
    smooth_normals: bool = True,
) -> MeshRender:
    """Render mask, depth, world normals, world positions and optional attributes of a mesh.

    cameras: anything with `mvp_bx4x4(near, far)` (world -> clip), `c2w_bx4x4` (OpenGL
    camera-to-world), `height` and `width` (backend.cameras.Cameras).
    """
    if verts_vx3.dim() != 2 or verts_vx3.shape[-1] != 3:
        raise ValueError(f"verts_vx3 must be [V, 3], got {tuple(verts_vx3.shape)}")
    if vertex_attrs is not None and (vertex_attrs.dim() not in (2, 3) or vertex_attrs.shape[-2] != verts_vx3.shape[0]):
        raise ValueError(
            f"vertex_attrs must be [V={verts_vx3.shape[0]}, C] or [B, V, C], got {tuple(vertex_attrs.shape)}"
        )
    mvp_bx4x4 = cameras.mvp_bx4x4(near, far).to(verts_vx3)
    c2w_bx4x4 = cameras.c2w_bx4x4.to(verts_vx3)
    height, width = int(cameras.height), int(cameras.width)
    # 1. Project and rasterise.
    verts_h_vx4 = torch.cat([verts_vx3, torch.ones_like(verts_vx3[:, :1])], dim=-1)
    clip_bxvx4 = torch.einsum("bij,vj->bvi", mvp_bx4x4, verts_h_vx4)
    rast = rasterizer.rasterize(clip_bxvx4, faces_fx3, height, width)
    hit = (rast[..., 3:4] > 0).to(verts_vx3.dtype)
    # 2. Mask (antialiased where the rasteriser can), positions and view-axis depth.
    mask = rasterizer.antialias(hit, rast, clip_bxvx4, faces_fx3)
    xyz = rasterizer.interpolate(verts_vx3, rast, faces_fx3)
    eye_bx3, forward_bx3 = c2w_bx4x4[:, :3, 3], -c2w_bx4x4[:, :3, 2]
    depth = ((xyz - eye_bx3[:, None, None]) * forward_bx3[:, None, None]).sum(-1, keepdim=True) * hit
    # 3. Normals: interpolated vertex normals, or the visible face's normal.
    if smooth_normals:
        normal = rasterizer.interpolate(vertex_normals(verts_vx3, faces_fx3), rast, faces_fx3)
        normal = torch.nn.functional.normalize(normal, dim=-1, eps=1e-12) * hit
    else:
        tri_id = rast[..., 3].long() - 1
        normal = face_normals(verts_vx3, faces_fx3)[tri_id.clamp(min=0)] * hit
    attrs = None if vertex_attrs is None else rasterizer.interpolate(vertex_attrs, rast, faces_fx3)
    return MeshRender(mask=mask, depth=depth, normal=normal, xyz=xyz, rast=rast, attrs=attrs)


# ----------------------------------------------------------------------------------------------
# Benchmark: python -m backend.raster bench [--device cuda] [--kind torch|nvdiffrast]


def _bench_one(kind: str, device: torch.device, size: int, batch: int, subdivisions: int) -> dict:
    """Render an icosphere (20·4^subdivisions faces) from `batch` orbit views; time and memory."""
    import time

    import trimesh

    from backend.cameras import Cameras

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.45)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32, device=device).requires_grad_(True)
    faces = torch.tensor(mesh.faces, dtype=torch.int32, device=device)
    azimuths = torch.linspace(0.0, 360.0, batch + 1)[:batch]
    cams = Cameras.from_orbit(
        torch.full((batch,), 20.0), azimuths, torch.full((batch,), 2.0), torch.full((batch,), 40.0), size, size
    ).to(device)
    rasterizer = get_rasterizer(device, kind=kind)
    render_mesh(rasterizer, verts, faces, cams).depth.sum().backward()  # warm-up (and plugin build)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    repeats = 5
    forward_s = backward_s = 0.0
    cpu_start = time.process_time()  # CPU seconds of this process: robust to a shared machine
    for _ in range(repeats):
        start = synced()
        render = render_mesh(rasterizer, verts, faces, cams, vertex_attrs=verts)
        middle = synced()
        (render.depth.sum() + render.mask.sum() + render.attrs.sum()).backward()
        forward_s, backward_s = forward_s + middle - start, backward_s + synced() - middle
    cpu_s = time.process_time() - cpu_start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": type(rasterizer).__name__, "device": str(device), "size": size, "batch": batch,
        "faces": faces.shape[0], "forward_ms": round(1000 * forward_s / repeats, 1),
        "backward_ms": round(1000 * backward_s / repeats, 1),
        "cpu_ms_per_iteration": round(1000 * cpu_s / repeats, 1), "peak_mb": round(peak_mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import subprocess
    import sys

    parser = argparse.ArgumentParser(prog="python -m backend.raster", description="Rasteriser benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time and peak memory of render_mesh forward + backward")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--kind", default="torch", choices=["torch", "nvdiffrast", "auto"])
    bench.add_argument("--configs", default="128x1x5,128x4x5,256x4x5,512x4x6",
                       help="comma-separated SIZExBATCHxSUBDIVISIONS (faces = 20·4^subdivisions)")
    bench.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = [tuple(int(part) for part in config.split("x")) for config in args.configs.split(",")]
    if args.in_process:
        print(json.dumps(_bench_one(args.kind, torch.device(args.device), *configs[0])))
        return 0
    # One fresh process per configuration so peak memory is that configuration's own.
    for config in args.configs.split(","):
        command = [sys.executable, "-m", "backend.raster", "bench", "--device", args.device, "--kind", args.kind,
                   "--configs", config, "--in-process"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{config}: failed\n{result.stderr}", file=sys.stderr)
            return result.returncode
        print(result.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

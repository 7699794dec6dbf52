"""NeuS: a signed-distance field with a colour head, its volume renderer and an occupancy grid.

- ``NeuSField``: hash grid + small MLP -> SDF (plus an explicit sphere bias ``|x| - radius``,
  so the field starts as a sphere), and a colour head (the SDF MLP's feature vector and the
  detached unit normal -> RGB in [0, 1]: colour may follow the orientation, as shading does, but
  colour gradients never bend the geometry through the normal, DreamCraft3D's concern; see
  docs/pipeline.md). Normals are finite differences of the SDF on a tetrahedron of
  offsets (4 extra SDF evaluations in one batched call): with a hash grid this is cheaper than double backward, and
  the eikonal loss on it needs first-order gradients only.
- ``render_rays`` / ``render_neus``: samples in the ray's span inside the scene cube, NeuS's
  unbiased alpha from the SDF with a learnable sharpness ``inv_s = exp(10·variance)`` (threestudio's
  parameterisation: ten times the log-rate of a plain log) and
  cosine annealing, alpha compositing over a background colour, and the eikonal term.
- ``OccupancyGrid``: a coarse grid marking cells that may hold the surface; samples in other
  cells are skipped (never evaluated).
- ``fit_to_images``: fits a field to posed RGBA images (random rays per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.cameras import SCENE_BOUND, Cameras, orbit_cameras
from backend.hashgrid import HashGrid, HashGridConfig

# ---------------------------------------------------------------------------------------------
# 1. The field
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuSConfig:
    """Size and initial state of a NeuS field."""

    grid: HashGridConfig = field(default_factory=HashGridConfig)
    """The hash-grid encoding shared by the SDF and the colour head."""
    hidden_dim: int = 64
    """Width of the hidden layers of both MLPs."""
    num_hidden_layers: int = 1
    """Hidden layers of the SDF MLP."""
    feature_dim: int = 15
    """Length of the geometry feature vector the SDF MLP passes to the colour head."""
    color_hidden_layers: int = 1
    """Hidden layers of the colour MLP."""
    sphere_radius: float = 0.5
    """Radius of the sphere the SDF starts as (an explicit ``|x| - radius`` bias)."""
    init_inv_s: float = 20.0
    """Initial sharpness of NeuS's logistic density (1 / standard deviation)."""
    normal_epsilon: float = 5e-3
    """Step of the tetrahedral finite differences of the SDF, in world units (threestudio's 0.01
    in its [-2, 2] cube, the same fraction of our [-1, 1] one)."""

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_hidden_layers", "feature_dim", "color_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NeuSConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 < self.sphere_radius < self.grid.bound:
            raise ValueError(f"NeuSConfig.sphere_radius must be in (0, {self.grid.bound}), got {self.sphere_radius!r}")
        if not self.init_inv_s > 0:
            raise ValueError(f"NeuSConfig.init_inv_s must be > 0, got {self.init_inv_s!r}")
        if not self.normal_epsilon > 0:
            raise ValueError(f"NeuSConfig.normal_epsilon must be > 0, got {self.normal_epsilon!r}")


INV_S_SCALE = 10.0
"""inv_s = exp(INV_S_SCALE · variance): threestudio's LearnedVariance, so Adam moves log inv_s
ten times faster than a plain log parameter at the same learning rate."""
TETRAHEDRON_4X3 = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
"""Finite-difference offsets (vertices of a regular tetrahedron, unnormalised)."""


def _mlp(width_in: int, hidden: int, layers: int, width_out: int, device, dtype) -> nn.Sequential:
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width_in, hidden, device=device, dtype=dtype), nn.ReLU()]
        width_in = hidden
    modules.append(nn.Linear(width_in, width_out, device=device, dtype=dtype))
    return nn.Sequential(*modules)


@dataclass
class FieldSamples:
    """The field at a batch of points."""

    sdf_n: Tensor
    """Signed distance (negative inside)."""
    gradient_nx3: Tensor
    """Finite-difference SDF gradient (not normalised; its norm is what the eikonal term sees)."""
    features_nxk: Tensor
    """Geometry features for the colour head."""

    @property
    def normal_nx3(self) -> Tensor:
        return F.normalize(self.gradient_nx3, dim=-1, eps=1e-8)


class NeuSField(nn.Module):
    """SDF + colour field in the scene cube ``[-bound, bound]^3``."""

    def __init__(self, config: NeuSConfig, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config.grid, device=device, dtype=dtype)
        width_in = 3 + self.encoding.output_dim
        self.sdf_mlp = _mlp(width_in, config.hidden_dim, config.num_hidden_layers, 1 + config.feature_dim, device, dtype)
        self.color_mlp = _mlp(config.feature_dim + 3, config.hidden_dim, config.color_hidden_layers, 3, device, dtype)
        # The SDF output row starts at zero, so the SDF starts as exactly |x| - radius.
        with torch.no_grad():
            self.sdf_mlp[-1].weight[0].zero_()
            self.sdf_mlp[-1].bias[0].zero_()
        self.variance = nn.Parameter(torch.tensor(math.log(config.init_inv_s) / INV_S_SCALE, device=device, dtype=dtype))

    @property
    def inv_s(self) -> Tensor:
        """Sharpness of the logistic density, ``exp(10·variance)`` clamped to [1e-2, 1e6]."""
        return (self.variance * INV_S_SCALE).exp().clamp(1e-2, 1e6)

    def update_step(self, step: int) -> None:
        """Apply the hash grid's coarse-to-fine schedule."""
        self.encoding.update_step(step)

    def _sdf_and_features(self, x_nx3: Tensor) -> tuple[Tensor, Tensor]:
        out_nxk = self.sdf_mlp(torch.cat([x_nx3, self.encoding(x_nx3)], dim=-1))
        sphere_n = x_nx3.norm(dim=-1) - self.config.sphere_radius
        return out_nxk[:, 0] + sphere_n, out_nxk[:, 1:]

    def sdf(self, x_nx3: Tensor) -> Tensor:
        """Signed distance ``[N]`` at world points ``[N, 3]``."""
        return self._sdf_and_features(x_nx3)[0]

    def query(self, x_nx3: Tensor) -> FieldSamples:
        """SDF, finite-difference gradient and colour features, in one batched evaluation.

        The gradient uses the 4 vertices ``o_k`` of a tetrahedron:
        ``grad = sum_k o_k * sdf(x + eps * o_k) / (4 * eps)`` (exact for linear functions,
        since ``sum_k o_k = 0`` and ``sum_k o_k o_k^T = 4 I``): 5 evaluations per point.
        """
        shifted_4nx3 = self._tetrahedron(x_nx3)
        sdf_all, features_all = self._sdf_and_features(torch.cat([x_nx3, shifted_4nx3]))
        num = x_nx3.shape[0]
        return FieldSamples(sdf_n=sdf_all[:num], gradient_nx3=self._fd_gradient(sdf_all[num:]),
                            features_nxk=features_all[:num])

    def _tetrahedron(self, x_nx3: Tensor) -> Tensor:
        """The 4 points ``x + eps * o_k`` around each point, ``[4 * N, 3]`` (k-major)."""
        offsets_4x3 = TETRAHEDRON_4X3.to(x_nx3)
        return (x_nx3[None] + self.config.normal_epsilon * offsets_4x3[:, None, :]).reshape(-1, 3)

    def _fd_gradient(self, shifted_sdf_4n: Tensor) -> Tensor:
        """``sum_k o_k * sdf(x + eps * o_k) / (4 * eps)`` from the SDF at `_tetrahedron`'s points."""
        offsets_4x3 = TETRAHEDRON_4X3.to(shifted_sdf_4n)
        shifted_4xn = shifted_sdf_4n.reshape(4, -1)
        return (shifted_4xn[:, :, None] * offsets_4x3[:, None, :]).sum(dim=0) / (4.0 * self.config.normal_epsilon)

    def sdf_and_normal(self, x_nx3: Tensor) -> tuple[Tensor, Tensor]:
        """SDF ``[N]`` and unit outward normal ``[N, 3]`` (finite differences)."""
        samples = self.query(x_nx3)
        return samples.sdf_n, samples.normal_nx3

    def color_of(self, samples: FieldSamples) -> Tensor:
        """RGB ``[N, 3]`` in [0, 1] of queried samples: the colour MLP on the geometry features and
        the unit normal, detached (colour can follow the surface's orientation, but colour gradients
        reach the geometry only through the shared features, never through the normal)."""
        return torch.sigmoid(self.color_mlp(torch.cat([samples.features_nxk, samples.normal_nx3.detach()], dim=-1)))

    def color(self, x_nx3: Tensor) -> Tensor:
        """RGB ``[N, 3]`` in [0, 1] at world points ``[N, 3]``. The normal's 4 SDF evaluations run
        without a graph: `color_of` detaches the normal, so only the features are backwarded."""
        sdf_n, features_nxk = self._sdf_and_features(x_nx3)
        with torch.no_grad():
            gradient_nx3 = self._fd_gradient(self._sdf_and_features(self._tetrahedron(x_nx3))[0])
        return self.color_of(FieldSamples(sdf_n=sdf_n, gradient_nx3=gradient_nx3, features_nxk=features_nxk))


# ---------------------------------------------------------------------------------------------
# 2. Occupancy grid
# ---------------------------------------------------------------------------------------------


class OccupancyGrid:
    """Cells of a ``resolution^3`` grid over the scene cube that may hold the surface.

    ``update`` evaluates the SDF at each cell centre. An SDF changes by at most its gradient norm
    (about 1) times the distance, so a cell whose centre has
    ``|sdf| > margin * half_diagonal + band / inv_s`` cannot hold the zero level. The second
    term keeps the soft shell of NeuS's density (width ~ 1 / inv_s) while ``inv_s`` is small.
    Until the first update every cell counts as occupied.
    """

    def __init__(
        self,
        resolution: int = 64,
        bound: float = SCENE_BOUND,
        device: torch.device | str = "cpu",
        update_every: int = 16,
        margin: float = 1.5,
        band: float = 6.0,
    ) -> None:
        if not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        self.resolution = resolution
        self.bound = bound
        self.update_every = update_every
        self.margin = margin
        self.band = band
        self.occupied_g3 = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=device)

    @property
    def cell_size(self) -> float:
        return 2.0 * self.bound / self.resolution

    def cell_centers(self, device: torch.device) -> Tensor:
        """``[G^3, 3]`` centres, x fastest (matches ``occupied_g3[k, j, i]`` flattening)."""
        coords_g = (torch.arange(self.resolution, dtype=torch.float32, device=device) + 0.5) * self.cell_size - self.bound
        z, y, x = torch.meshgrid(coords_g, coords_g, coords_g, indexing="ij")
        return torch.stack([x, y, z], dim=-1).reshape(-1, 3)

    @torch.no_grad()
    def update(self, field: NeuSField, step: int | None = None, chunk: int = 65536) -> bool:
        """Re-evaluate the grid (every ``update_every`` steps when ``step`` is given).
        Returns whether it was updated."""
        if step is not None and step % self.update_every != 0:
            return False
        device = self.occupied_g3.device
        centers_mx3 = self.cell_centers(device)
        half_diagonal = 0.5 * math.sqrt(3.0) * self.cell_size
        threshold = self.margin * half_diagonal + self.band / float(field.inv_s)
        sdf_m = torch.cat([field.sdf(part) for part in centers_mx3.split(chunk)])
        occupied = sdf_m.abs() <= threshold
        self.occupied_g3 = occupied.reshape(self.resolution, self.resolution, self.resolution)
        return True

    def lookup(self, x_nx3: Tensor) -> Tensor:
        """Whether each point's cell is occupied ``[N]`` (points outside the cube: False)."""
        ijk_nx3 = torch.floor((x_nx3 + self.bound) / self.cell_size).long()
        inside_n = ((ijk_nx3 >= 0) & (ijk_nx3 < self.resolution)).all(dim=-1)
        ijk_nx3 = ijk_nx3.clamp(0, self.resolution - 1)
        occupied_n = self.occupied_g3[ijk_nx3[:, 2], ijk_nx3[:, 1], ijk_nx3[:, 0]]
        return occupied_n & inside_n

    def occupied_fraction(self) -> float:
        return float(self.occupied_g3.float().mean())


# ---------------------------------------------------------------------------------------------
# 3. Volume rendering
# ---------------------------------------------------------------------------------------------


def ray_box_bounds(origins_rx3: Tensor, dirs_rx3: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances ``[R]`` of rays in the cube ``[-bound, bound]^3`` (slab method),
    entry clamped at 0, and whether the ray hits it at all."""
    safe_dirs = torch.where(dirs_rx3.abs() < 1e-9, torch.full_like(dirs_rx3, 1e-9), dirs_rx3)
    t_low = (-bound - origins_rx3) / safe_dirs
    t_high = (bound - origins_rx3) / safe_dirs
    near_r = torch.minimum(t_low, t_high).amax(dim=-1).clamp_min(0.0)
    far_r = torch.maximum(t_low, t_high).amin(dim=-1)
    hit_r = far_r > near_r
    return near_r, torch.where(hit_r, far_r, near_r), hit_r


def neus_alpha(sdf_m: Tensor, cos_m: Tensor, dist_m: Tensor, inv_s: Tensor, cos_anneal_ratio: float) -> Tensor:
    """NeuS's unbiased opacity of each ray interval.

    The SDF at the interval ends is estimated from the centre value and the slope along the ray
    (``cos`` = ray direction . SDF gradient); the slope is annealed from ``-(cos*0.5+0.5)``
    (also letting rays that leave the surface see it, early on) to ``-relu(-cos)``.
    """
    iter_cos = -(F.relu(-cos_m * 0.5 + 0.5) * (1.0 - cos_anneal_ratio) + F.relu(-cos_m) * cos_anneal_ratio)
    prev_cdf = torch.sigmoid((sdf_m - iter_cos * dist_m * 0.5) * inv_s)
    next_cdf = torch.sigmoid((sdf_m + iter_cos * dist_m * 0.5) * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def render_rays(
    field: NeuSField,
    origins_rx3: Tensor,
    dirs_rx3: Tensor,
    background_rgb: Tensor,
    num_samples: int,
    inv_s: Tensor | float | None = None,
    cos_anneal_ratio: float = 1.0,
    occupancy: OccupancyGrid | None = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Volume-render a flat batch of rays (unit directions).

    background_rgb: ``[3]`` or ``[R, 3]``, composited where the ray is not fully opaque.
    inv_s: overrides ``field.inv_s`` (e.g. a fixed schedule); None uses the learnt one.
    stratified: jitter each sample inside its interval (training) instead of its midpoint.
    Returns ``rgb [R,3]``, ``opacity [R,1]``, ``depth [R,1]`` (expected distance along the ray,
    ``sum(w * t)``, not divided by opacity), ``normal [R,3]`` (world, ``sum(w * n)``),
    ``weights [R,S]``, ``eikonal`` (mean ``(|grad sdf| - 1)^2`` over evaluated samples, 0 when
    none) and ``evaluated`` (how many samples the field saw).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not 0.0 <= cos_anneal_ratio <= 1.0:
        raise ValueError(f"cos_anneal_ratio must be in [0, 1], got {cos_anneal_ratio!r}")
    device, dtype = origins_rx3.device, origins_rx3.dtype
    num_rays = origins_rx3.shape[0]
    sharpness = field.inv_s if inv_s is None else torch.as_tensor(inv_s, device=device, dtype=dtype)
    # 1. the span of each ray inside the scene cube, cut into num_samples equal intervals
    near_r, far_r, hit_r = ray_box_bounds(origins_rx3, dirs_rx3, field.config.grid.bound)
    step_r = (far_r - near_r) / num_samples
    offsets_s = torch.arange(num_samples, device=device, dtype=dtype)
    jitter_rxs = _rand((num_rays, num_samples), generator, device).to(dtype) if stratified else torch.full(
        (num_rays, num_samples), 0.5, device=device, dtype=dtype
    )
    t_rxs = near_r[:, None] + (offsets_s[None] + jitter_rxs) * step_r[:, None]
    points_rxsx3 = origins_rx3[:, None, :] + t_rxs[..., None] * dirs_rx3[:, None, :]
    # 2. keep the samples that can matter: on rays that hit the cube, in occupied cells
    keep_rxs = hit_r[:, None].expand(-1, num_samples)
    if occupancy is not None:
        keep_rxs = keep_rxs & occupancy.lookup(points_rxsx3.reshape(-1, 3)).reshape(num_rays, num_samples)
    # 3. the field at the kept samples only
    samples = field.query(points_rxsx3[keep_rxs])
    normal_mx3 = samples.normal_nx3
    rgb_mx3 = field.color_of(samples)
    dirs_mx3 = dirs_rx3[:, None, :].expand(-1, num_samples, -1)[keep_rxs]
    cos_m = (dirs_mx3 * samples.gradient_nx3).sum(dim=-1)
    dist_m = step_r[:, None].expand(-1, num_samples)[keep_rxs]
    alpha_m = neus_alpha(samples.sdf_n, cos_m, dist_m, sharpness, cos_anneal_ratio)
    # 4. scatter back (skipped samples are transparent) and composite front to back
    alpha_rxs = torch.zeros(num_rays, num_samples, device=device, dtype=dtype).masked_scatter(keep_rxs, alpha_m)
    transmittance_rxs = torch.cumprod(
        torch.cat([torch.ones_like(alpha_rxs[:, :1]), 1.0 - alpha_rxs + 1e-7], dim=-1), dim=-1
    )[:, :-1]
    weights_rxs = alpha_rxs * transmittance_rxs
    weights_m = weights_rxs[keep_rxs]
    rgb_rx3 = _scatter_sum(weights_m[:, None] * rgb_mx3, keep_rxs)
    normal_rx3 = _scatter_sum(weights_m[:, None] * normal_mx3, keep_rxs)
    opacity_rx1 = weights_rxs.sum(dim=-1, keepdim=True)
    depth_rx1 = (weights_rxs * t_rxs).sum(dim=-1, keepdim=True)
    background_rx3 = background_rgb.to(device=device, dtype=dtype).expand(num_rays, 3)
    rgb_rx3 = rgb_rx3 + (1.0 - opacity_rx1) * background_rx3
    gradient_norm_m = samples.gradient_nx3.norm(dim=-1)
    eikonal = ((gradient_norm_m - 1.0) ** 2).mean() if gradient_norm_m.numel() else alpha_rxs.sum() * 0.0
    return {
        "rgb": rgb_rx3,
        "opacity": opacity_rx1,
        "depth": depth_rx1,
        "normal": normal_rx3,
        "weights": weights_rxs,
        "eikonal": eikonal,
        "evaluated": torch.tensor(int(keep_rxs.sum()), device=device),
    }


def _scatter_sum(values_mxc: Tensor, keep_rxs: Tensor) -> Tensor:
    """Per-ray sums ``[R, C]`` of values living at the kept samples."""
    num_rays, num_samples = keep_rxs.shape
    full = values_mxc.new_zeros(num_rays, num_samples, values_mxc.shape[-1])
    full = full.masked_scatter(keep_rxs[..., None].expand_as(full), values_mxc)
    return full.sum(dim=1)


def render_neus(
    field: NeuSField,
    cameras: Cameras,
    background_rgb: Tensor,
    num_samples: int,
    inv_s: Tensor | float | None = None,
    cos_anneal_ratio: float = 1.0,
    occupancy: OccupancyGrid | None = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    chunk_rays: int | None = None,
) -> dict[str, Tensor]:
    """Render whole images: ``rgb [B,H,W,3]``, ``opacity [B,H,W,1]``, ``depth [B,H,W,1]``,
    ``normal [B,H,W,3]`` (world), ``eikonal`` (scalar) and ``evaluated``.

    background_rgb: ``[3]`` or ``[B, H, W, 3]``. chunk_rays bounds the rays per field call
    (for previews under ``torch.no_grad``); None renders all rays at once.
    """
    batch, height, width = len(cameras), cameras.height, cameras.width
    origins, dirs = cameras.rays()
    origins_rx3, dirs_rx3 = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    background_rx3 = background_rgb.to(origins_rx3).expand(batch, height, width, 3).reshape(-1, 3)
    chunk = origins_rx3.shape[0] if chunk_rays is None else chunk_rays
    if chunk < 1:
        raise ValueError(f"chunk_rays must be a positive int, got {chunk_rays!r}")
    parts = [
        render_rays(
            field, origins_rx3[start : start + chunk], dirs_rx3[start : start + chunk],
            background_rx3[start : start + chunk], num_samples, inv_s, cos_anneal_ratio, occupancy,
            stratified, generator,
        )
        for start in range(0, origins_rx3.shape[0], chunk)
    ]
    out: dict[str, Tensor] = {}
    for name in ("rgb", "opacity", "depth", "normal"):
        joined = torch.cat([p[name] for p in parts])
        out[name] = joined.reshape(batch, height, width, -1)
    counts = torch.stack([p["evaluated"] for p in parts]).to(origins_rx3.dtype)
    eikonals = torch.stack([p["eikonal"] for p in parts])
    out["eikonal"] = (eikonals * counts).sum() / counts.sum().clamp_min(1.0)
    out["evaluated"] = counts.sum().long()
    return out


def cos_anneal(step: int, anneal_steps: int) -> float:
    """NeuS's cosine-annealing ratio: linear from 0 to 1 over ``anneal_steps`` (0: always 1)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, step / anneal_steps)


# ---------------------------------------------------------------------------------------------
# 4. Fitting to posed images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """Fitting a NeuS field to posed RGBA images with random rays."""

    steps: int = 500
    """Optimisation steps."""
    rays_per_step: int = 1024
    """Random pixels (over all views) per step."""
    num_samples: int = 64
    """Samples per ray."""
    lr: float = 1e-2
    """Adam learning rate of the hash grid; the MLPs use a tenth of it."""
    inv_s_lr: float = 1e-3
    """Adam learning rate of ``variance`` (inv_s = exp(10·variance))."""
    rgb_weight: float = 1.0
    """Weight of the colour MSE (against the target composited over the background)."""
    mask_weight: float = 1.0
    """Weight of the opacity-vs-alpha binary cross-entropy."""
    eikonal_weight: float = 0.1
    """Weight of the eikonal term."""
    anneal_steps: int = 0
    """Steps of cosine annealing (0: none)."""
    background_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Background colour behind the object."""

    def __post_init__(self) -> None:
        for name in ("steps", "rays_per_step", "num_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FitConfig.{name} must be a positive int, got {value!r}")


def sample_pixels(
    origins_bxhxwx3: Tensor,
    dirs_bxhxwx3: Tensor,
    rgba_bxhxwx4: Tensor,
    num_rays: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random pixels of posed images (rays from ``Cameras.rays()``): ray origins ``[R, 3]``,
    unit directions ``[R, 3]`` and the target RGBA ``[R, 4]``. Indices are drawn on the
    generator's device and gathered on the images' device."""
    expected = (*origins_bxhxwx3.shape[:3], 4)
    if tuple(rgba_bxhxwx4.shape) != expected:
        raise ValueError(f"rgba_bxhxwx4 must have shape {expected}, got {tuple(rgba_bxhxwx4.shape)}")
    total = expected[0] * expected[1] * expected[2]
    device = rgba_bxhxwx4.device
    index_r = torch.randint(total, (num_rays,), generator=generator, device=generator.device if generator else device)
    index_r = index_r.to(device)
    return (
        origins_bxhxwx3.reshape(-1, 3)[index_r],
        dirs_bxhxwx3.reshape(-1, 3)[index_r],
        rgba_bxhxwx4.reshape(-1, 4)[index_r],
    )


def fit_to_images(
    field: NeuSField,
    cameras: Cameras,
    rgba_bxhxwx4: Tensor,
    config: FitConfig,
    generator: torch.Generator | None = None,
    occupancy: OccupancyGrid | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """Fit ``field`` to RGBA images (alpha = object mask) seen by ``cameras``; returns the total
    loss of each step."""
    grid_params = list(field.encoding.parameters())
    mlp_params = list(field.sdf_mlp.parameters()) + list(field.color_mlp.parameters())
    optimizer = torch.optim.Adam(
        [
            {"params": grid_params, "lr": config.lr},
            {"params": mlp_params, "lr": config.lr * 0.1},
            {"params": [field.variance], "lr": config.inv_s_lr},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    background_3 = torch.tensor(config.background_rgb, dtype=rgba_bxhxwx4.dtype, device=rgba_bxhxwx4.device)
    origins_bxhxwx3, dirs_bxhxwx3 = cameras.to(rgba_bxhxwx4.device).rays()
    losses: list[float] = []
    for step in range(config.steps):
        # 1. schedules: hash-grid levels, occupancy refresh, cosine annealing
        field.update_step(step)
        if occupancy is not None:
            occupancy.update(field, step)
        ratio = cos_anneal(step, config.anneal_steps)
        # 2. render random rays
        origins_rx3, dirs_rx3, target_rx4 = sample_pixels(
            origins_bxhxwx3, dirs_bxhxwx3, rgba_bxhxwx4, config.rays_per_step, generator
        )
        out = render_rays(
            field, origins_rx3, dirs_rx3, background_3, config.num_samples, None, ratio, occupancy,
            stratified=True, generator=generator,
        )
        # 3. losses: colour over the background, mask, eikonal
        alpha_rx1 = target_rx4[:, 3:]
        target_rgb_rx3 = target_rx4[:, :3] * alpha_rx1 + background_3 * (1.0 - alpha_rx1)
        loss_rgb = F.mse_loss(out["rgb"], target_rgb_rx3)
        opacity_rx1 = out["opacity"].clamp(1e-4, 1.0 - 1e-4)
        loss_mask = F.binary_cross_entropy(opacity_rx1, alpha_rx1)
        loss = config.rgb_weight * loss_rgb + config.mask_weight * loss_mask + config.eikonal_weight * out["eikonal"]
        # 4. step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, {"rgb": loss_rgb.item(), "mask": loss_mask.item(), "eikonal": out["eikonal"].item()})
    return losses


# ---------------------------------------------------------------------------------------------
# 5. Benchmark: python -m backend.neus --bench --device cuda|cpu
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(device: str, rays: int, num_samples: int, repeats: int, config: NeuSConfig) -> dict[str, float]:
    """Median wall-clock and process-CPU milliseconds of a training step (render ``rays`` random
    rays, backward) with and without the occupancy grid, and the samples the field evaluated."""
    import time

    torch_device = torch.device(device)
    field = NeuSField(config, device=torch_device)
    cameras = Cameras.cat([orbit_cameras(8, 15.0, 3.8, 20.0, 64, 64), orbit_cameras(8, -5.0, 3.8, 20.0, 64, 64, start_azimuth_deg=22.5)])
    origins, dirs = cameras.to(torch_device).rays()
    generator = torch.Generator(device=torch_device).manual_seed(0)
    occupancy = OccupancyGrid(resolution=64, device=torch_device)
    occupancy.update(field)
    background_3 = torch.ones(3, device=torch_device)
    results: dict[str, float] = {"occupied_fraction": occupancy.occupied_fraction()}
    for name, grid in (("step_ms_no_occupancy", None), ("step_ms_occupancy", occupancy)):
        times_ms, cpu_ms = [], []
        for step in range(repeats + 2):
            index_r = torch.randint(origins.numel() // 3, (rays,), generator=generator, device=torch_device)
            _sync(torch_device)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = render_rays(
                field, origins.reshape(-1, 3)[index_r], dirs.reshape(-1, 3)[index_r], background_3,
                num_samples, occupancy=grid, stratified=True, generator=generator,
            )
            (out["rgb"].mean() + out["eikonal"]).backward()
            _sync(torch_device)
            if step >= 2:
                times_ms.append((time.perf_counter() - start) * 1e3)
                cpu_ms.append((time.process_time() - start_cpu) * 1e3)
        results[name] = sorted(times_ms)[len(times_ms) // 2]
        results[name.replace("step_ms", "cpu_ms")] = sorted(cpu_ms)[len(cpu_ms) // 2]
        results[name.replace("step_ms", "evaluated")] = float(out["evaluated"])
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m backend.neus", description="NeuS training-step benchmark")
    parser.add_argument("--bench", action="store_true", help="time a render+backward step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--rays", type=int, default=4096, help="rays per step")
    parser.add_argument("--samples", type=int, default=64, help="samples per ray")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--levels", type=int, default=16, help="hash-grid levels")
    parser.add_argument("--log2-table-size", type=int, default=19)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for this run (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 2
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    for flag, value in (("--rays", args.rays), ("--samples", args.samples), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    config = NeuSConfig(grid=HashGridConfig(num_levels=args.levels, log2_table_size=args.log2_table_size))
    results = benchmark(args.device, args.rays, args.samples, args.repeats, config)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"NeuS step: {args.rays} rays x {args.samples} samples, grid {args.levels} levels x 2^{args.log2_table_size}, "
        f"{name}, threads={torch.get_num_threads()}"
    )
    print(f"  occupancy grid 64^3 (initial sphere): {results['occupied_fraction']:.3f} of cells occupied")
    for label, key in (("without occupancy", "no_occupancy"), ("with occupancy", "occupancy")):
        print(
            f"  {label:17s}: {results['step_ms_' + key]:.1f} ms/step (process CPU {results['cpu_ms_' + key]:.1f} ms), "
            f"{results['evaluated_' + key]:.0f} samples evaluated"
        )
    if args.json is not None:
        import json

        with open(args.json, "w") as file:
            json.dump(results, file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-resolution hash encoding (Instant-NGP) in plain PyTorch, with a fused Triton twin on CUDA.

Level l has ``R_l = floor(base_resolution * per_level_scale**l)`` cells per axis, so
``(R_l + 1)**3`` grid vertices. A point in ``[-bound, bound]^3`` is mapped to ``[0, 1]^3``,
scaled by ``R_l``, and its 8 surrounding vertices are looked up in the level's table of
``2**log2_table_size`` rows of ``features_per_level`` numbers and blended trilinearly.
Vertex ``(i, j, k)`` is row ``i + j*(R+1) + k*(R+1)**2`` where the whole grid fits the table
(dense level), else row ``(i*1 XOR j*2654435761 XOR k*805459861) mod 2**log2_table_size``
(hashed level). Levels at or above ``active_levels`` output zeros (coarse-to-fine training).

Run ``python -m backend.hashgrid --bench --device cuda --points 262144`` for timings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from backend.cameras import SCENE_BOUND

HASH_PRIMES = (1, 2654435761, 805459861)
"""Instant-NGP's per-axis primes for the spatial hash."""

Implementation = Literal["auto", "torch", "triton"]


@dataclass(frozen=True)
class HashGridConfig:
    """Shape of a multi-resolution hash encoding and its coarse-to-fine schedule."""

    num_levels: int = 16
    """Number of resolution levels L."""
    features_per_level: int = 2
    """Features F stored per grid vertex and level; the output has L*F channels."""
    log2_table_size: int = 19
    """Each level's table holds 2**log2_table_size rows."""
    base_resolution: int = 16
    """Cells per axis of the coarsest level."""
    per_level_scale: float = 1.447269237440378
    """Growth factor of the resolution from one level to the next (16 -> 4096 over 16 levels)."""
    bound: float = SCENE_BOUND
    """Inputs are expected in [-bound, bound]^3; outside, they are clamped to the cube."""
    start_levels: int = 0
    """Levels active at step 0 of the schedule; 0 means all levels from the start."""
    level_every_steps: int = 0
    """One more level is unmasked every this many steps (0: no schedule)."""

    def __post_init__(self) -> None:
        positive = ("num_levels", "features_per_level", "base_resolution")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HashGridConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.log2_table_size, int) or not 4 <= self.log2_table_size <= 30:
            raise ValueError(f"HashGridConfig.log2_table_size must be an int in [4, 30], got {self.log2_table_size!r}")
        if not self.per_level_scale >= 1.0:
            raise ValueError(f"HashGridConfig.per_level_scale must be >= 1, got {self.per_level_scale!r}")
        if not self.bound > 0:
            raise ValueError(f"HashGridConfig.bound must be > 0, got {self.bound!r}")
        if not 0 <= self.start_levels <= self.num_levels:
            raise ValueError(f"HashGridConfig.start_levels must be in [0, num_levels], got {self.start_levels!r}")
        if self.level_every_steps < 0:
            raise ValueError(f"HashGridConfig.level_every_steps must be >= 0, got {self.level_every_steps!r}")

    @property
    def table_size(self) -> int:
        return 2**self.log2_table_size

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def resolutions(self) -> list[int]:
        """Cells per axis of each level."""
        return [
            int(math.floor(self.base_resolution * self.per_level_scale**level + 1e-6))
            for level in range(self.num_levels)
        ]

    def dense_levels(self) -> list[bool]:
        """Whether each level's whole vertex grid fits its table (indexed densely, no hash)."""
        return [(res + 1) ** 3 <= self.table_size for res in self.resolutions()]

    def levels_at_step(self, step: int) -> int:
        """Active levels at a training step under the schedule."""
        if self.start_levels == 0 or self.level_every_steps == 0:
            return self.num_levels
        return min(self.num_levels, self.start_levels + step // self.level_every_steps)


CORNERS_8X3 = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]
"""The 8 cell corners, corner c = dx + 2*dy + 4*dz."""


def vertex_rows(corner_nx8x3: Tensor, resolution: int, dense: bool, table_size: int) -> Tensor:
    """Table rows ``[N, 8]`` (int64) of integer vertex coordinates at one level."""
    i, j, k = corner_nx8x3.unbind(-1)
    if dense:
        side = resolution + 1
        return i + j * side + k * (side * side)
    hashed = (i * HASH_PRIMES[0]) ^ (j * HASH_PRIMES[1]) ^ (k * HASH_PRIMES[2])
    return hashed & (table_size - 1)


def level_corners(x01_nx3: Tensor, resolution: int, dense: bool, table_size: int) -> tuple[Tensor, Tensor]:
    """Table rows ``[N, 8]`` (int64) and trilinear weights ``[N, 8]`` of the 8 vertices around
    points in [0, 1]^3 at one level (the weights carry the gradient with respect to the points)."""
    corners_8x3 = torch.tensor(CORNERS_8X3, dtype=torch.int64, device=x01_nx3.device)
    pos_nx3 = x01_nx3 * resolution
    cell_nx3 = pos_nx3.detach().floor().clamp(0, resolution - 1).to(torch.int64)
    frac_nx3 = pos_nx3 - cell_nx3.to(pos_nx3.dtype)
    rows_nx8 = vertex_rows(cell_nx3[:, None, :] + corners_8x3[None], resolution, dense, table_size)
    weight_nx8x3 = torch.where(corners_8x3[None].bool(), frac_nx3[:, None, :], 1.0 - frac_nx3[:, None, :])
    return rows_nx8, weight_nx8x3.prod(dim=-1)


def encode_torch(
    x01_nx3: Tensor, table_lxtxf: Tensor, resolutions: list[int], dense: list[bool], active_levels: int
) -> Tensor:
    """All levels ``[N, L*F]``; levels from ``active_levels`` on are zeros.

    The rows of all active levels are gathered from the flattened table in one ``index_select``,
    so the backward pass zero-fills the (large) table gradient once, not once per level.
    """
    num_points = x01_nx3.shape[0]
    num_levels, table_size, num_features = table_lxtxf.shape
    if active_levels == 0:
        return x01_nx3.new_zeros(num_points, num_levels * num_features)
    # 1. rows (offset into the flattened table) and weights of each active level
    rows, weights = [], []
    for level in range(active_levels):
        rows_nx8, weight_nx8 = level_corners(x01_nx3, resolutions[level], dense[level], table_size)
        rows.append(rows_nx8 + level * table_size)
        weights.append(weight_nx8)
    rows_nxax8 = torch.stack(rows, dim=1)
    weight_nxax8 = torch.stack(weights, dim=1)
    # 2. one gather, then the weighted sum over the 8 corners
    flat_table = table_lxtxf.reshape(num_levels * table_size, num_features)
    features_nxax8xf = flat_table.index_select(0, rows_nxax8.reshape(-1)).reshape(*rows_nxax8.shape, num_features)
    encoded_nxaxf = (features_nxax8xf * weight_nxax8[..., None]).sum(dim=2)
    # 3. masked levels are zeros
    encoded_nxf = encoded_nxaxf.reshape(num_points, active_levels * num_features)
    if active_levels < num_levels:
        padding = encoded_nxf.new_zeros(num_points, (num_levels - active_levels) * num_features)
        encoded_nxf = torch.cat([encoded_nxf, padding], dim=-1)
    return encoded_nxf


def triton_available() -> bool:
    """Whether the fused kernel can be imported (Triton installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class HashGrid(nn.Module):
    """Multi-resolution hash encoding: ``[N, 3]`` points in [-bound, bound]^3 -> ``[N, L*F]``."""

    def __init__(
        self,
        config: HashGridConfig,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        implementation: Implementation = "auto",
        init_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if implementation not in ("auto", "torch", "triton"):
            raise ValueError(f"implementation must be 'auto', 'torch' or 'triton', got {implementation!r}")
        self.config = config
        self.implementation: Implementation = implementation
        self.resolutions = config.resolutions()
        self.dense = config.dense_levels()
        table = torch.empty(config.num_levels, config.table_size, config.features_per_level, device=device, dtype=dtype)
        self.table_lxtxf = nn.Parameter(table.uniform_(-init_scale, init_scale))
        self.active_levels = config.levels_at_step(0)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def set_active_levels(self, levels: int) -> None:
        """Unmask the first ``levels`` levels; the rest output zeros."""
        if not isinstance(levels, int) or not 0 <= levels <= self.config.num_levels:
            raise ValueError(f"levels must be an int in [0, {self.config.num_levels}], got {levels!r}")
        self.active_levels = levels

    def update_step(self, step: int) -> None:
        """Apply the config's coarse-to-fine schedule at a training step."""
        self.set_active_levels(self.config.levels_at_step(step))

    def normalize(self, x_nx3: Tensor) -> Tensor:
        """World points -> [0, 1]^3 (clamped)."""
        bound = self.config.bound
        return ((x_nx3 + bound) / (2.0 * bound)).clamp(0.0, 1.0)

    def use_triton(self, x_nx3: Tensor) -> bool:
        if self.implementation == "torch":
            return False
        fits = x_nx3.is_cuda and self.table_lxtxf.dtype == torch.float32 and x_nx3.dtype == torch.float32
        fits = fits and self.config.features_per_level in (1, 2, 4, 8)
        if self.implementation == "triton":
            if not (fits and triton_available()):
                raise RuntimeError(
                    "implementation='triton' needs float32 CUDA inputs, features_per_level in "
                    f"(1, 2, 4, 8) and Triton installed; got device={x_nx3.device}, dtype={x_nx3.dtype}, "
                    f"features_per_level={self.config.features_per_level}, triton={triton_available()}"
                )
            return True
        return fits and triton_available()

    def forward(self, x_nx3: Tensor) -> Tensor:
        if x_nx3.ndim != 2 or x_nx3.shape[-1] != 3:
            raise ValueError(f"x_nx3 must have shape [N, 3], got {tuple(x_nx3.shape)}")
        x01_nx3 = self.normalize(x_nx3)
        if self.use_triton(x_nx3):
            from backend import hashgrid_triton

            return hashgrid_triton.encode(
                x01_nx3, self.table_lxtxf, self.resolutions, self.dense, self.active_levels
            )
        return encode_torch(x01_nx3, self.table_lxtxf, self.resolutions, self.dense, self.active_levels)


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m backend.hashgrid --bench --device cuda|cpu --points N
# ---------------------------------------------------------------------------------------------


def _time_forward_backward(grid: HashGrid, x_nx3: Tensor, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU milliseconds of one forward + backward."""
    device = x_nx3.device
    wall_ms, cpu_ms = [], []
    for step in range(repeats + 2):
        # 1. start clean: gradients from the last repeat would add up
        grid.table_lxtxf.grad = None
        x = x_nx3.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        # 2. forward and backward of a scalar that touches every output
        grid(x).square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # 3. the first two runs warm up (allocator, kernel compilation)
        if step >= 2:
            wall_ms.append((time.perf_counter() - start) * 1e3)
            cpu_ms.append((time.process_time() - start_cpu) * 1e3)
    return sorted(wall_ms)[len(wall_ms) // 2], sorted(cpu_ms)[len(cpu_ms) // 2]


def benchmark(
    device: str, points: int, repeats: int, config: HashGridConfig
) -> dict[str, tuple[float, float] | str]:
    """Forward+backward (wall ms, process-CPU ms) of each implementation that can run on
    ``device``, or why it cannot."""
    generator = torch.Generator().manual_seed(0)
    x_nx3 = (torch.rand(points, 3, generator=generator) * 2 - 1).to(device)
    results: dict[str, tuple[float, float] | str] = {}
    for implementation in ("torch", "triton"):
        grid = HashGrid(config, device=device, implementation="torch")
        grid.implementation = implementation  # type: ignore[assignment]
        try:
            grid.use_triton(x_nx3)
        except RuntimeError as error:
            results[implementation] = f"unavailable ({error})"
            continue
        results[implementation] = _time_forward_backward(grid, x_nx3, repeats)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.hashgrid", description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time forward+backward of each implementation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--points", type=int, default=262144, help="number of points per call")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--log2-table-size", type=int, default=19)
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for this run (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 2
    if args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = HashGridConfig(
        num_levels=args.levels, log2_table_size=args.log2_table_size, features_per_level=args.features
    )
    results = benchmark(args.device, args.points, args.repeats, config)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"hash grid {config.num_levels} levels x 2^{config.log2_table_size} x {config.features_per_level}, "
        f"{args.points} points, {name}, threads={torch.get_num_threads()}"
    )
    for implementation, value in results.items():
        shown = value if isinstance(value, str) else f"{value[0]:.2f} ms forward+backward (process CPU {value[1]:.2f} ms)"
        print(f"  {implementation:7s} {shown}")
    if args.json is not None:
        args.json.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DMTet: a deformable tetrahedral grid with per-vertex SDF, and differentiable marching tetrahedra.

The grid is implicit: a regular N³ grid of cubes over centre ± bound, each cube split into six
tetrahedra around its main diagonal (the Kuhn/Freudenthal split, identical in every cube, so
neighbouring cubes share faces exactly). Vertices are the (N+1)³ grid corners, numbered
`(i·(N+1) + j)·(N+1) + k` for the corner at index (i, j, k) along (x, y, z). Tetrahedra are never
stored for the whole grid: each `extract` finds the cubes whose corners change SDF sign, builds
only their tetrahedra, and runs marching tetrahedra on the ones crossing the surface, so memory
scales with the surface, not the volume. See docs/mesh_rendering.md.

SDF convention: negative inside, positive outside. Output faces are counter-clockwise seen from
outside. A vertex whose SDF is exactly 0 counts as outside.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from backend.cameras import SCENE_BOUND


class SDFField(Protocol):
    """Anything with a signed distance function (NeuS's field, an analytic shape)."""

    def sdf(self, x_nx3: Tensor) -> Tensor:
        """[N] signed distances (negative inside) at world points [N, 3]."""
        ...


def _kuhn_tets_6x4x3() -> np.ndarray:
    """Corner offsets (dx, dy, dz) of the six tetrahedra of a unit cube, all positively oriented.

    Tetrahedron for the axis permutation (p, q, r): 000 → e_p → e_p + e_q → 111. The six share the
    diagonal 000–111; odd permutations get their last two corners swapped so every signed volume
    is +1/6.
    """
    tets = []
    for p, q, _ in itertools.permutations(range(3)):
        a = np.zeros(3, dtype=np.int64)
        b = a.copy()
        b[p] = 1
        c = b.copy()
        c[q] = 1
        d = np.ones(3, dtype=np.int64)
        if np.linalg.det(np.stack([b - a, c - a, d - a])) < 0:
            c, d = d, c
        tets.append(np.stack([a, b, c, d]))
    return np.stack(tets)


CUBE_TETS_6x4x3 = _kuhn_tets_6x4x3()
"""Corners of the six tetrahedra of a cube, as 0/1 offsets along (x, y, z)."""

TET_EDGES_6x2 = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.long)
"""The six edges of a tetrahedron as pairs of its corner slots."""

# Marching-tetrahedra table (Shen et al. 2021; nvdiffrec's and threestudio's table): for the
# 4-bit case index Σ inside_k·2^k, up to two triangles given as tetrahedron edge slots
# (TET_EDGES_6x2). nvdiffrec marks SDF > 0 as occupied; we mark SDF < 0 as inside, so each
# triangle here is nvdiffrec's with its last two corners swapped: with positively oriented
# tetrahedra the triangles are then counter-clockwise seen from outside.
TRIANGLE_TABLE_16x6 = torch.tensor(
    [
        [-1, -1, -1, -1, -1, -1],
        [1, 2, 0, -1, -1, -1],
        [4, 3, 0, -1, -1, -1],
        [1, 2, 4, 1, 4, 3],
        [3, 5, 1, -1, -1, -1],
        [2, 0, 3, 2, 3, 5],
        [1, 0, 4, 1, 4, 5],
        [4, 5, 2, -1, -1, -1],
        [4, 2, 5, -1, -1, -1],
        [4, 0, 1, 4, 1, 5],
        [3, 0, 2, 3, 2, 5],
        [1, 5, 3, -1, -1, -1],
        [4, 2, 1, 4, 1, 3],
        [3, 4, 0, -1, -1, -1],
        [2, 1, 0, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1],
    ],
    dtype=torch.long,
)
NUM_TRIANGLES_16 = torch.tensor([0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0], dtype=torch.long)
"""Triangles emitted per case."""


@dataclass(frozen=True)
class TetGrid:
    """The implicit tetrahedral grid: N³ cubes over centre ± bound, six tetrahedra each."""

    resolution: int
    """Cubes per axis (N); the grid has (N+1)³ vertices and 6·N³ tetrahedra."""
    bound: float = SCENE_BOUND
    """Half the side of the cube the grid covers."""
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Centre of the cube the grid covers."""

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {self.resolution!r}")
        if (self.resolution + 1) ** 3 >= 2**31:
            raise ValueError(f"resolution {self.resolution} has too many vertices for int32 ids")
        if not self.bound > 0:
            raise ValueError(f"bound must be > 0, got {self.bound!r}")

    @property
    def num_vertices(self) -> int:
        return (self.resolution + 1) ** 3

    @property
    def num_tets(self) -> int:
        return 6 * self.resolution**3

    @property
    def cell_size(self) -> float:
        return 2.0 * self.bound / self.resolution

    def vertex_ids(self, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
        """Vertex id of the grid corner with integer index (i, j, k)."""
        n1 = self.resolution + 1
        return (i * n1 + j) * n1 + k

    def positions(self, ids_n: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Undeformed world positions [N, 3] of vertex ids [N]."""
        n1 = self.resolution + 1
        ijk_nx3 = torch.stack([ids_n // (n1 * n1), (ids_n // n1) % n1, ids_n % n1], dim=-1)
        centre = torch.tensor(self.centre, dtype=dtype, device=ids_n.device)
        return ijk_nx3.to(dtype) * self.cell_size - self.bound + centre

    def tets_of_cubes(self, cube_ijk_cx3: Tensor) -> Tensor:
        """The six tetrahedra [6·C, 4] (vertex ids, int64) of cubes given by their lowest corner."""
        offsets_6x4x3 = torch.as_tensor(CUBE_TETS_6x4x3, device=cube_ijk_cx3.device)
        corners = cube_ijk_cx3[:, None, None, :] + offsets_6x4x3[None]  # [C, 6, 4, 3]
        return self.vertex_ids(corners[..., 0], corners[..., 1], corners[..., 2]).reshape(-1, 4)

    def all_tets(self, device: torch.device | str = "cpu") -> Tensor:
        """Every tetrahedron [6·N³, 4]: for small grids and tests (6·256³ ids take 3.2 GB)."""
        axis = torch.arange(self.resolution, device=device)
        cube_ijk = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        return self.tets_of_cubes(cube_ijk)

    def surface_cubes(self, inside_v: Tensor) -> Tensor:
        """Lowest-corner indices [C, 3] of cubes whose eight corners are not all inside or all out."""
        n = self.resolution
        volume = inside_v.reshape(n + 1, n + 1, n + 1)
        any_in = torch.zeros(n, n, n, dtype=torch.bool, device=inside_v.device)
        all_in = torch.ones(n, n, n, dtype=torch.bool, device=inside_v.device)
        for dx, dy, dz in itertools.product((0, 1), repeat=3):
            corner = volume[dx : dx + n, dy : dy + n, dz : dz + n]
            any_in |= corner
            all_in &= corner
        return torch.nonzero(any_in & ~all_in)


def evaluate_sdf_on_grid(
    sdf_fn: Callable[[Tensor], Tensor], grid: TetGrid, device: torch.device | str, chunk: int = 262144
) -> Tensor:
    """SDF values [(N+1)³] at the grid vertices, evaluated in chunks without gradient."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    sdf_v = torch.empty(grid.num_vertices, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, grid.num_vertices, chunk):
            ids = torch.arange(start, min(start + chunk, grid.num_vertices), device=device)
            values = sdf_fn(grid.positions(ids))
            if values.numel() != ids.numel():
                raise ValueError(
                    f"field.sdf returned {tuple(values.shape)} for {ids.numel()} points; expected [N]"
                )
            sdf_v[start : start + ids.numel()] = values.reshape(-1).float()
    if not bool(torch.isfinite(sdf_v).all()):
        raise ValueError("field.sdf returned non-finite values on the grid")
    return sdf_v


def _weld_and_drop_degenerate(verts_vx3: Tensor, faces_fx3: Tensor) -> tuple[Tensor, Tensor]:
    """Merge crossings that landed on the same point (an SDF of ±0 up to rounding at a grid
    vertex), then drop triangles left with a repeated corner and the unused vertices.

    The first vertex of each group of equal positions represents it (and carries its gradient).
    """
    if verts_vx3.shape[0] == 0:
        return verts_vx3, faces_fx3  # no surface crosses the grid
    with torch.no_grad():
        _, group_v = torch.unique(verts_vx3.detach(), dim=0, return_inverse=True)
        if group_v.max() + 1 == verts_vx3.shape[0]:
            return verts_vx3, faces_fx3  # nothing coincides: the common case
        order = torch.arange(verts_vx3.shape[0], device=verts_vx3.device)
        first_of_group = torch.full_like(order, verts_vx3.shape[0]).scatter_reduce(
            0, group_v, order, reduce="amin", include_self=True
        )[: int(group_v.max()) + 1]
        faces_fx3 = group_v[faces_fx3]
        a, b, c = faces_fx3.unbind(-1)
        distinct = (a != b) & (b != c) & (c != a)
        faces_fx3 = faces_fx3[distinct]
        used, faces_fx3 = torch.unique(faces_fx3, return_inverse=True)
    return verts_vx3[first_of_group[used]], faces_fx3


def marching_tetrahedra(
    grid: TetGrid,
    sdf_v: Tensor,
    positions_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable marching tetrahedra over the surface-crossing tetrahedra of `grid`.

    sdf_v: [(N+1)³] per-vertex SDF (gradients flow to it through the interpolation weights).
    positions_fn: vertex ids [K] -> positions [K, 3] (e.g. deformed, differentiable); defaults to
    the undeformed grid. Returns verts_vx3 (float32) and faces_fx3 (int32), one vertex per
    crossing grid edge (crossings at the same point merged), counter-clockwise seen from outside,
    triangles with a repeated corner dropped.
    """
    if sdf_v.shape != (grid.num_vertices,):
        raise ValueError(f"sdf_v must have shape [{grid.num_vertices}], got {tuple(sdf_v.shape)}")
    device = sdf_v.device
    positions_fn = positions_fn or (lambda ids: grid.positions(ids).to(device))
    # 1. Which tetrahedra cross the surface (no gradient, vectorised).
    with torch.no_grad():
        inside_v = sdf_v.detach() < 0
        tets_tx4 = grid.tets_of_cubes(grid.surface_cubes(inside_v))
        inside_tx4 = inside_v[tets_tx4]
        case_t = (inside_tx4.long() * (2 ** torch.arange(4, device=device))).sum(-1)
        crossing = (case_t > 0) & (case_t < 15)
        tets_tx4, inside_tx4, case_t = tets_tx4[crossing], inside_tx4[crossing], case_t[crossing]
        # 2. One output vertex per crossing grid edge, shared by every tetrahedron using it.
        edges_tx6x2 = tets_tx4[:, TET_EDGES_6x2.to(device)]
        edges_tx6x2, _ = edges_tx6x2.sort(dim=-1)
        cut_tx6 = inside_tx4[:, TET_EDGES_6x2[:, 0]] != inside_tx4[:, TET_EDGES_6x2[:, 1]]
        keys = edges_tx6x2[..., 0] * grid.num_vertices + edges_tx6x2[..., 1]
        unique_keys, edge_index = torch.unique(keys[cut_tx6], return_inverse=True)
        slot_to_vertex_tx6 = torch.full_like(keys, -1)
        slot_to_vertex_tx6[cut_tx6] = edge_index
        edge_a, edge_b = unique_keys // grid.num_vertices, unique_keys % grid.num_vertices
    # 3. The zero crossing on each edge, differentiable w.r.t. SDF values and positions. An SDF
    #    of exactly 0 (outside) is nudged outwards by 1e-4 of a cell so that the crossings of
    #    its edges stay distinct points instead of collapsing onto the vertex.
    nudge = 1e-4 * grid.cell_size
    sdf_a, sdf_b = sdf_v[edge_a], sdf_v[edge_b]
    sdf_a = torch.where(sdf_a == 0, torch.full_like(sdf_a, nudge), sdf_a)
    sdf_b = torch.where(sdf_b == 0, torch.full_like(sdf_b, nudge), sdf_b)
    pos_a, pos_b = positions_fn(edge_a), positions_fn(edge_b)
    weight_a = (sdf_b / (sdf_b - sdf_a)).unsqueeze(-1)
    verts_vx3 = pos_a * weight_a + pos_b * (1 - weight_a)
    # 4. Triangles from the case table.
    with torch.no_grad():
        table = TRIANGLE_TABLE_16x6.to(device)[case_t]  # [T, 6] edge slots
        count = NUM_TRIANGLES_16.to(device)[case_t]
        first = torch.gather(slot_to_vertex_tx6, 1, table[:, :3].clamp(min=0))
        second = torch.gather(slot_to_vertex_tx6, 1, table[:, 3:].clamp(min=0))[count == 2]
        faces_fx3 = torch.cat([first, second], dim=0)
    verts_vx3, faces_fx3 = _weld_and_drop_degenerate(verts_vx3, faces_fx3)
    return verts_vx3.float(), faces_fx3.to(torch.int32)


class DMTet(nn.Module):
    """Deformable tetrahedral grid with learnable per-vertex SDF and bounded offsets."""

    def __init__(self, grid: TetGrid, sdf_v: Tensor) -> None:
        super().__init__()
        if sdf_v.shape != (grid.num_vertices,):
            raise ValueError(
                f"sdf_v must have shape [{grid.num_vertices}] for resolution {grid.resolution}, "
                f"got {tuple(sdf_v.shape)}"
            )
        self.grid = grid
        """The implicit grid (resolution and bound)."""
        self.sdf = nn.Parameter(sdf_v.detach().float().clone())
        """[(N+1)³] learnable SDF at the grid vertices (negative inside)."""
        self.deform = nn.Parameter(torch.zeros(grid.num_vertices, 3, device=sdf_v.device))
        """[(N+1)³, 3] learnable offsets; a vertex moves by tanh(deform)·max_offset."""
        self.max_offset = grid.cell_size
        """Largest displacement of a vertex along each axis: one cell (threestudio's bound)."""

    @classmethod
    def from_sdf(
        cls,
        field: SDFField,
        resolution: int,
        device: torch.device | str,
        chunk: int = 262144,
        bound: float = SCENE_BOUND,
        padding: float | None = None,
    ) -> "DMTet":
        """A DMTet whose SDF is `field.sdf` sampled at the grid vertices (in chunks, no_grad).

        The grid spans the scene cube; with `padding`, it hugs the field's surface instead: the
        cube around the bounding box of its zero level set (extracted at `resolution` over the
        scene cube), the longest side padded by `padding` of it on each side, so all
        `resolution` cells span the object (an empty surface keeps the scene cube)."""
        sdf_method = getattr(field, "sdf", None)
        if not callable(sdf_method):
            raise TypeError(f"field must have a callable .sdf(x_nx3), got {type(field).__name__}")
        grid = TetGrid(resolution, bound)
        if padding is not None:
            verts_vx3, _ = extract_mesh_from_sdf(sdf_method, resolution, device, bound, chunk)
            if len(verts_vx3) > 0:
                low_3, high_3 = verts_vx3.min(dim=0).values, verts_vx3.max(dim=0).values
                half = float((high_3 - low_3).max()) * (0.5 + padding)
                grid = TetGrid(resolution, min(max(half, 1e-3), bound),
                               tuple(float(v) for v in (low_3 + high_3) / 2))
        return cls(grid, evaluate_sdf_on_grid(sdf_method, grid, device, chunk))

    def vertex_positions(self, ids_n: Tensor) -> Tensor:
        """Deformed positions [N, 3] of vertex ids [N] (differentiable w.r.t. `deform`)."""
        base = self.grid.positions(ids_n).to(self.deform.device)
        return base + torch.tanh(self.deform[ids_n]) * self.max_offset

    def extract(self) -> tuple[Tensor, Tensor]:
        """The current surface: verts_vx3 (differentiable w.r.t. sdf and deform), faces_fx3 int32."""
        return marching_tetrahedra(self.grid, self.sdf, self.vertex_positions)


def extract_mesh_from_sdf(
    sdf_fn: Callable[[Tensor], Tensor],
    resolution: int,
    device: torch.device | str,
    bound: float = SCENE_BOUND,
    chunk: int = 262144,
) -> tuple[Tensor, Tensor]:
    """A mesh of the zero level set of `sdf_fn` (e.g. NeuS's field.sdf), detached from autograd."""
    grid = TetGrid(resolution, bound)
    sdf_v = evaluate_sdf_on_grid(sdf_fn, grid, device, chunk)
    with torch.no_grad():
        return marching_tetrahedra(grid, sdf_v)


# ----------------------------------------------------------------------------------------------
# Benchmark: python -m backend.dmtet bench 64 128 256 [--device cuda]


class SphereSDF:
    """Analytic sphere SDF, used by the benchmark."""

    def __init__(self, radius: float) -> None:
        self.radius = radius

    def sdf(self, x_nx3: Tensor) -> Tensor:
        return x_nx3.norm(dim=-1) - self.radius


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bench_one(resolution: int, device: torch.device) -> dict:
    """Time from_sdf, extract and one backward at one resolution; peak memory of this process."""

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    cpu_start = time.process_time()  # CPU seconds of this process: robust to a shared machine
    start = synced()
    dmtet = DMTet.from_sdf(SphereSDF(0.45), resolution, device)
    built = synced()
    verts, faces = dmtet.extract()
    extracted = synced()
    verts.square().sum().backward()
    backward = synced()
    cpu_s = time.process_time() - cpu_start
    return {
        "resolution": resolution,
        "device": str(device),
        "vertices": dmtet.grid.num_vertices,
        "tets": dmtet.grid.num_tets,
        "from_sdf_s": round(built - start, 3),
        "extract_s": round(extracted - built, 3),
        "backward_s": round(backward - extracted, 3),
        "cpu_s_total": round(cpu_s, 3),
        "mesh_verts": verts.shape[0],
        "mesh_faces": faces.shape[0],
        "peak_mb": round(_peak_memory_mb(device), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.dmtet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time and memory of from_sdf + extract per resolution")
    bench.add_argument("resolutions", type=int, nargs="+")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.in_process:
        print(json.dumps(_bench_one(args.resolutions[0], device)))
        return 0
    # One fresh process per resolution so peak memory is that resolution's own.
    for resolution in args.resolutions:
        command = [sys.executable, "-m", "backend.dmtet", "bench", str(resolution),
                   "--device", args.device, "--in-process"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"resolution {resolution}: failed\n{result.stderr}", file=sys.stderr)
            return result.returncode
        print(result.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the mesh budget: decimation, xatlas unwrapping and baking per mesh and budget.

    python -m backend.bench_decimate [--meshes spot bunny teapot dmtet] [--targets 50000 5000]
        [--texture-size 1024] [--points 20000] [--compare-pyfqmr] [--out FILE.jsonl]

For each mesh (normalised to the unit box) and each budget below its face count (a budget at or
above it keeps the mesh whole and is measured so too), one JSON line: faces in and out, seconds
of the simplifier (in-process, and through the worker process the pipeline uses), of xatlas
(through the worker, with `backend.uvatlas`'s options) and of the bake (`bake_texture` of a
position colour on this machine's rasteriser) with the CPU seconds of each (the unwrap's: its
child process's), the UV mesh's vertices per input vertex (seams split vertices),
the chamfer / F-score / normal consistency of the decimated surface against the full one (bbox
diagonals, `backend.metrics`) with the same metric between two samplings of the full surface
(`floor`: what sampling alone gives), and how long a cancel took to stop the unwrap.

`dmtet` is a DMTet surface of a known shape (a box with a ring through it, `box_with_ring_sdf`)
extracted at resolution 136 over [-0.6, 0.6]³: about 265k faces, like the draft
reconstruction's. `--compare-pyfqmr` also times `pyfqmr` (not a dependency: `pip install
pyfqmr==0.5.0` first) at the same budgets, for the choice of simplifier.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend.decimate import AGGRESSIVENESS, decimate, simplify
from backend.dmtet import extract_mesh_from_sdf
from backend.meshio import load_mesh, normalize_to_unit_box
from backend.metrics import chamfer_and_fscore, nearest_neighbours, sample_surface
from backend.raster import get_rasterizer
from backend.texture import bake_texture, unwrap

MESHES = Path(__file__).resolve().parents[1] / ".." / "shared" / "meshes"
MESH_FILES = {"spot": "spot.obj", "bunny": "stanford-bunny.obj", "teapot": "teapot.obj"}
DMTET_RESOLUTION = 136
CANCEL_AFTER_S = 0.5


def box_with_ring_sdf(points_nx3: torch.Tensor) -> torch.Tensor:
    """A box (sharp edges, flat faces) with a torus through it; sides off the grid's planes."""
    q_nx3 = points_nx3.abs() - torch.tensor([0.31, 0.205, 0.155])
    box_n = q_nx3.clamp(min=0).norm(dim=-1) + q_nx3.max(dim=-1).values.clamp(max=0)
    radial_n = torch.stack([points_nx3[:, 0], points_nx3[:, 2]], -1).norm(dim=-1) - 0.4
    ring_n = torch.stack([radial_n, points_nx3[:, 1]], -1).norm(dim=-1) - 0.09
    return torch.minimum(box_n, ring_n)


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "dmtet":
        verts_vx3, faces_fx3 = extract_mesh_from_sdf(box_with_ring_sdf, DMTET_RESOLUTION, "cpu", bound=0.6)
        return verts_vx3.numpy(), faces_fx3.numpy()
    mesh = load_mesh(MESHES / MESH_FILES[name], triangulate=True)
    return normalize_to_unit_box(mesh.verts_vx3)[0].astype(np.float32), mesh.faces_fx3.astype(np.int32)


def sampling_floor(verts_vx3: np.ndarray, faces_fx3: np.ndarray, points: int) -> float:
    """Chamfer (bbox diagonals) between two independent samplings of the same surface."""
    verts, faces = torch.as_tensor(verts_vx3).float(), torch.as_tensor(faces_fx3).long()
    first_nx3, _ = sample_surface(verts, faces, points, torch.Generator().manual_seed(1))
    second_nx3, _ = sample_surface(verts, faces, points, torch.Generator().manual_seed(2))
    diagonal = float((verts.max(0).values - verts.min(0).values).norm())
    there, _ = nearest_neighbours(first_nx3, second_nx3)
    back, _ = nearest_neighbours(second_nx3, first_nx3)
    return 0.5 * float(there.mean() + back.mean()) / diagonal


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cancel_latency_s(verts_vx3: np.ndarray, faces_fx3: np.ndarray, texture_size: int) -> float | None:
    """Seconds from a cancel (CANCEL_AFTER_S into the unwrap) until `unwrap` has returned."""
    class Cancelled(Exception):
        pass

    started = time.monotonic()
    requested: float | None = None

    def check() -> None:
        nonlocal requested
        now = time.monotonic()
        if now - started >= CANCEL_AFTER_S:
            requested = requested or now
            raise Cancelled

    try:
        unwrap(verts_vx3, faces_fx3, texture_size, check_cancelled=check)
    except Cancelled:
        return round(time.monotonic() - requested, 3)
    return None  # done before the cancel came


def pyfqmr_seconds(verts_vx3: np.ndarray, faces_fx3: np.ndarray, target: int) -> tuple[float, int]:
    import pyfqmr

    started = time.perf_counter()
    simplifier = pyfqmr.Simplify()
    simplifier.setMesh(verts_vx3.astype(np.float64), faces_fx3.astype(np.int32))
    simplifier.simplify_mesh(target_count=target, aggressiveness=AGGRESSIVENESS, preserve_border=True, verbose=False)
    _, faces, _ = simplifier.getMesh()
    return time.perf_counter() - started, len(faces)


def measure(name: str, verts_vx3: np.ndarray, faces_fx3: np.ndarray, target: int, args) -> dict:
    row: dict = {"mesh": name, "faces_in": int(len(faces_fx3)), "target_faces": target}
    started, cpu_started = time.perf_counter(), time.process_time()
    if target < len(faces_fx3):
        simplify(verts_vx3, faces_fx3, target)
    row["simplify_s"] = round(time.perf_counter() - started, 3)
    row["simplify_cpu_s"] = round(time.process_time() - cpu_started, 3)
    decimated = decimate(verts_vx3, faces_fx3, target)
    row["decimate_worker_s"] = round(decimated.seconds, 3)
    row["faces_out"] = int(len(decimated.faces_fx3))
    row["notes"] = decimated.notes
    if args.compare_pyfqmr and target < len(faces_fx3):
        seconds, faces = pyfqmr_seconds(verts_vx3, faces_fx3, target)
        row["pyfqmr_s"], row["pyfqmr_faces"] = round(seconds, 3), faces
    cpu_before, started = children_cpu_s(), time.perf_counter()
    uv_mesh = unwrap(decimated.verts_vx3, decimated.faces_fx3, args.texture_size)
    row["unwrap_s"] = round(time.perf_counter() - started, 3)
    row["unwrap_cpu_s"] = round(children_cpu_s() - cpu_before, 3)
    row["uv_verts_per_vert"] = round(len(uv_mesh.verts_vx3) / len(decimated.verts_vx3), 3)
    device = torch.device("cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    bake_texture(uv_mesh, lambda points_nx3: points_nx3 + 0.5, args.texture_size, get_rasterizer(device), device)
    row["bake_s"] = round(time.perf_counter() - started, 3)
    row["bake_cpu_s"] = round(time.process_time() - cpu_started, 3)
    metrics = chamfer_and_fscore(decimated.verts_vx3, decimated.faces_fx3.astype(np.int64), verts_vx3,
                                 faces_fx3.astype(np.int64), n_points=args.points)
    row.update(chamfer=round(metrics.chamfer, 5), f_score=round(metrics.f_score, 4),
               normal_consistency=round(metrics.normal_consistency, 4),
               floor=round(sampling_floor(verts_vx3, faces_fx3, args.points), 5))
    row["cancel_unwrap_s"] = cancel_latency_s(decimated.verts_vx3, decimated.faces_fx3, args.texture_size)
    row["load_average"] = round(os.getloadavg()[0], 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.bench_decimate", description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="+", default=["spot", "bunny", "teapot", "dmtet"],
                        choices=[*MESH_FILES, "dmtet"])
    parser.add_argument("--targets", nargs="+", type=int, default=[50_000])
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--points", type=int, default=20_000, help="surface samples for the chamfer")
    parser.add_argument("--compare-pyfqmr", action="store_true")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in args.meshes:
        verts_vx3, faces_fx3 = load(name)
        for target in args.targets:
            line = json.dumps(measure(name, verts_vx3, faces_fx3, target, args))
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as stream:
                    stream.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The mesh budget: quadric decimation to a face count on real meshes and a real DMTet surface,
the clamping notes, a surface the simplifier cannot reduce, and the worker process that lets a
cancel stop the simplifier and xatlas."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from backend.bench_decimate import box_with_ring_sdf
from backend.decimate import MIN_FACES, decimate, face_budget
from backend.dmtet import extract_mesh_from_sdf
from backend.jobs import JobCancelled
from backend.meshio import load_mesh, normalize_to_unit_box
from backend.metrics import chamfer_and_fscore
from backend.texture import unwrap
from backend.worker import WorkerCrashed, call_stoppable

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"


def unit_mesh(name: str) -> tuple[np.ndarray, np.ndarray]:
    mesh = load_mesh(MESHES / name, triangulate=True)
    return normalize_to_unit_box(mesh.verts_vx3)[0], mesh.faces_fx3


def assert_keeps_shape(verts_vx3, faces_fx3, full_vx3, full_fx3, chamfer_bound: float) -> None:
    metrics = chamfer_and_fscore(verts_vx3, faces_fx3.astype(np.int64), full_vx3, full_fx3.astype(np.int64),
                                 n_points=20000)
    # 20,000 samples on two different triangulations of one surface lie about 0.0034 diagonals
    # apart by sampling alone (fewer samples lower the F-score by sampling alone too); the
    # bounds leave room for that, not for a changed shape.
    assert metrics.chamfer < chamfer_bound, metrics
    assert metrics.f_score > 0.98, metrics
    assert metrics.normal_consistency > 0.95, metrics
    np.testing.assert_allclose(verts_vx3.min(0), full_vx3.min(0), atol=0.01)  # the silhouette's extent
    np.testing.assert_allclose(verts_vx3.max(0), full_vx3.max(0), atol=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name, target", [("stanford-bunny.obj", 10_000), ("teapot.obj", 2_000)])
def test_decimation_reaches_the_budget_and_keeps_the_shape(name: str, target: int) -> None:
    verts_vx3, faces_fx3 = unit_mesh(name)
    result = decimate(verts_vx3, faces_fx3, target)
    assert result.notes == [] and result.faces_in == len(faces_fx3)
    assert 0.95 * target <= len(result.faces_fx3) <= target
    assert result.verts_vx3.dtype == np.float32 and result.faces_fx3.dtype == np.int32
    assert result.faces_fx3.min() >= 0 and result.faces_fx3.max() < len(result.verts_vx3)
    assert_keeps_shape(result.verts_vx3, result.faces_fx3, verts_vx3, faces_fx3, chamfer_bound=0.0045)


@pytest.mark.slow
def test_a_dmtet_surface_decimated_keeps_its_sharp_box_and_its_ring() -> None:
    verts_vx3, faces_fx3 = (t.numpy() for t in extract_mesh_from_sdf(box_with_ring_sdf, 64, "cpu", bound=0.6))
    assert len(faces_fx3) > 50_000
    result = decimate(verts_vx3, faces_fx3, 5_000)
    assert 4_750 <= len(result.faces_fx3) <= 5_000
    assert_keeps_shape(result.verts_vx3, result.faces_fx3, verts_vx3, faces_fx3, chamfer_bound=0.0045)
    # Closed and of the same genus as before (a box with a ring through it).
    import trimesh

    before = trimesh.Trimesh(verts_vx3, faces_fx3, process=False)
    after = trimesh.Trimesh(result.verts_vx3, result.faces_fx3, process=False)
    assert after.is_watertight and after.euler_number == before.euler_number


def test_budgets_below_the_minimum_or_above_the_surface_are_clamped_with_a_note() -> None:
    assert face_budget(0, 10_000) == (10_000, [])
    assert face_budget(4_000, 10_000) == (4_000, [])
    target, notes = face_budget(100, 10_000)
    assert target == MIN_FACES and len(notes) == 1 and "100" in notes[0] and "500" in notes[0]
    target, notes = face_budget(20_000, 10_000)
    assert target == 10_000 and len(notes) == 1 and "20,000" in notes[0] and "10,000" in notes[0]
    for bad in (-1, 1.5, "5000", True, None):
        with pytest.raises(ValueError, match="target_faces"):
            face_budget(bad, 10_000)
    # Through decimate: raised to the minimum, or the surface kept whole.
    verts_vx3, faces_fx3 = unit_mesh("spot.obj")
    low = decimate(verts_vx3, faces_fx3, 10)
    assert 0.95 * MIN_FACES <= len(low.faces_fx3) <= MIN_FACES and "below the 500" in low.notes[0]
    high = decimate(verts_vx3, faces_fx3, 1_000_000)
    np.testing.assert_array_equal(high.faces_fx3, faces_fx3)
    assert "keeping all" in high.notes[0] and high.seconds == 0.0


def test_a_surface_the_simplifier_cannot_reduce_keeps_its_faces_with_a_note() -> None:
    # A triangle soup (no two faces share a vertex): every edge is an open border, which the
    # simplifier keeps, so nothing can collapse.
    verts_vx3, faces_fx3 = unit_mesh("suzanne.obj")
    soup_vx3 = verts_vx3[faces_fx3].reshape(-1, 3)
    soup_fx3 = np.arange(len(soup_vx3)).reshape(-1, 3)
    result = decimate(soup_vx3, soup_fx3, 600)
    assert len(result.faces_fx3) == len(soup_fx3)
    assert len(result.notes) == 1 and "stopped at 968" in result.notes[0]
    area = lambda v, f: np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()  # noqa: E731
    assert area(result.verts_vx3, result.faces_fx3) == pytest.approx(area(soup_vx3, soup_fx3), rel=1e-5)


def test_bad_arrays_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"decimate needs verts \[V, 3\] and faces \[F>0, 3\]"):
        decimate(np.zeros((4, 2)), np.zeros((2, 3), dtype=np.int32), 1000)


class CancelAfter:
    """A `check_cancelled` that raises `JobCancelled` from `delay_s` after its first call on."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.first: float | None = None
        self.requested_at: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        self.first = self.first or now
        if now - self.first >= self.delay_s:
            self.requested_at = self.requested_at or now
            raise JobCancelled("cancelled by the test")


def test_cancel_stops_xatlas_mid_unwrap() -> None:
    # xatlas on the full bunny takes far longer than a second; the cancel comes after 1 s.
    verts_vx3, faces_fx3 = unit_mesh("stanford-bunny.obj")
    cancel = CancelAfter(1.0)
    with pytest.raises(JobCancelled):
        unwrap(verts_vx3, faces_fx3, 1024, check_cancelled=cancel)
    stopped_after_s = time.monotonic() - cancel.requested_at
    assert stopped_after_s < 1.0, stopped_after_s  # the child is killed, not waited for


def test_cancel_stops_the_simplifier() -> None:
    verts_vx3, faces_fx3 = (t.numpy() for t in extract_mesh_from_sdf(box_with_ring_sdf, 96, "cpu", bound=0.6))
    cancel = CancelAfter(0.2)
    with pytest.raises(JobCancelled):
        decimate(verts_vx3, faces_fx3, 2_000, check_cancelled=cancel)
    assert time.monotonic() - cancel.requested_at < 1.0


def test_the_worker_raises_the_function_error_and_reports_a_crash() -> None:
    budget = "backend.decimate:face_budget"
    assert call_stoppable(budget, {"target_faces": 600, "faces_in": 900}) == (600, [])
    with pytest.raises(ValueError, match="target_faces must be an integer >= 0, got -1"):
        call_stoppable(budget, {"target_faces": -1, "faces_in": 900})
    with pytest.raises(WorkerCrashed, match="os:abort stopped with exit code -6"):
        call_stoppable("os:abort", {})

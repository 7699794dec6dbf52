"""Chamfer, F-score, normal consistency and PSNR on real meshes and known cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import trimesh

from backend.meshio import load_mesh
from backend.metrics import chamfer_and_fscore, nearest_neighbours, psnr, sample_surface

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"


def test_identical_meshes_score_perfectly() -> None:
    mesh = load_mesh(MESHES / "spot.obj")
    metrics = chamfer_and_fscore(mesh.verts_vx3, mesh.faces_fx3, mesh.verts_vx3, mesh.faces_fx3, n_points=8000)
    assert metrics.chamfer < 1e-6
    assert metrics.f_score == 1.0 and metrics.precision == 1.0 and metrics.recall == 1.0
    assert metrics.normal_consistency > 0.999


def test_scaled_sphere_gives_the_expected_chamfer() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4)  # radius 1, bbox diagonal 2*sqrt(3)
    diagonal = 2.0 * math.sqrt(3.0)
    results = {}
    for scale in (1.01, 1.05):
        metrics = chamfer_and_fscore(sphere.vertices * scale, sphere.faces, sphere.vertices, sphere.faces, n_points=6000)
        expected = (scale - 1.0) / diagonal  # every point is (scale - 1) from the other surface
        assert metrics.chamfer == pytest.approx(expected, rel=0.03)
        assert metrics.normal_consistency > 0.999
        results[scale] = metrics
    # 1.01 is 0.0029 diagonals away (inside the 1 % threshold), 1.05 is 0.0144 (outside).
    assert results[1.01].f_score > 0.99 and results[1.05].f_score == 0.0


def test_half_a_surface_has_full_precision_and_partial_recall() -> None:
    grid = trimesh.creation.box(extents=(1.0, 1.0, 1.0)).subdivide().subdivide()
    keep = grid.triangles_center[:, 2] > 0.49  # the top face only
    top = trimesh.Trimesh(grid.vertices, grid.faces[keep], process=False)
    # 5 % of the diagonal (0.087) is well above the sample spacing (about 0.027 on the top face).
    metrics = chamfer_and_fscore(top.vertices, top.faces, grid.vertices, grid.faces, n_points=8000, threshold=0.05)
    assert metrics.precision == 1.0
    assert 0.17 < metrics.recall < 0.28  # one face of six, plus side bands 0.087 high: (1 + 0.35) / 6


def test_normal_consistency_sees_a_rotated_surface() -> None:
    box = trimesh.creation.box()
    rotated = box.vertices @ trimesh.transformations.rotation_matrix(math.radians(30), [0, 0, 1])[:3, :3].T
    metrics = chamfer_and_fscore(rotated, box.faces, box.vertices, box.faces, n_points=4000)
    assert metrics.normal_consistency < 0.97 and metrics.chamfer > 0.01


def test_surface_samples_are_uniform_by_area() -> None:
    # Two triangles, the second with three times the first one's area.
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [5, 0, 0], [2, 2, 0]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    points_nx3, normals_nx3 = sample_surface(verts, faces, 20000, torch.Generator().manual_seed(0))
    share_second = float((points_nx3[:, 0] >= 2.0).float().mean())
    assert share_second == pytest.approx(3.0 / 3.5, abs=0.01)  # areas 0.5 and 3
    torch.testing.assert_close(normals_nx3, torch.tensor([0.0, 0.0, 1.0]).expand_as(normals_nx3))


def test_nearest_neighbours_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    query, reference = torch.rand(300, 3, generator=generator), torch.rand(500, 3, generator=generator)
    distance, index = nearest_neighbours(query, reference, chunk=64)
    full = (query[:, None] - reference[None]).norm(dim=-1)
    torch.testing.assert_close(distance, full.min(dim=1).values)
    torch.testing.assert_close(index, full.argmin(dim=1))


def test_psnr_known_values_and_mask() -> None:
    reference = torch.zeros(1, 4, 4, 3)
    image = torch.full((1, 4, 4, 3), 0.1)
    assert psnr(image, reference) == pytest.approx(20.0)
    assert psnr(reference, reference) == math.inf
    mask = torch.zeros(1, 4, 4, 1)
    mask[:, :2] = 1.0
    image[:, 2:] = 0.5  # outside the mask: ignored
    assert psnr(image, reference, mask) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(image, reference[..., :2])
    with pytest.raises(ValueError, match="mask selects no pixels"):
        psnr(image, reference, torch.zeros(1, 4, 4, 1))

"""Floater removal before UV unwrapping, on a real mesh with specks added around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.mesh_clean import drop_floaters
from backend.meshio import load_mesh

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"


def _tetrahedron(centre: tuple[float, float, float], size: float, first_vertex: int):
    verts = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float32) * size + centre
    faces = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]], dtype=np.int64) + first_vertex
    return verts, faces


def test_specks_go_and_spot_stays_exactly() -> None:
    spot = load_mesh(MESHES / "spot.obj", triangulate=True)
    verts, faces = [spot.verts_vx3], [spot.faces_fx3.astype(np.int64)]
    count = len(spot.verts_vx3)
    for centre in ((2.0, 0.0, 0.0), (0.0, 2.0, 1.0), (-2.0, -1.0, 0.5)):
        speck_v, speck_f = _tetrahedron(centre, 0.05, count)
        verts.append(speck_v)
        faces.append(speck_f)
        count += 4
    verts_vx3 = torch.as_tensor(np.concatenate(verts))
    faces_fx3 = torch.as_tensor(np.concatenate(faces), dtype=torch.int32)
    kept_v, kept_f = drop_floaters(verts_vx3, faces_fx3)
    assert kept_f.dtype == torch.int32
    assert torch.equal(kept_v, torch.as_tensor(spot.verts_vx3))
    assert torch.equal(kept_f.long(), torch.as_tensor(spot.faces_fx3).long())


def test_large_pieces_stay_and_the_largest_always_does() -> None:
    # Two tetrahedra of 4 faces each: each holds half the faces, both stay.
    first_v, first_f = _tetrahedron((0.0, 0.0, 0.0), 0.2, 0)
    second_v, second_f = _tetrahedron((1.0, 0.0, 0.0), 0.2, 4)
    verts = torch.as_tensor(np.concatenate([first_v, second_v]))
    faces = torch.as_tensor(np.concatenate([first_f, second_f]))
    kept_v, kept_f = drop_floaters(verts, faces, min_fraction=0.4)
    assert len(kept_v) == 8 and len(kept_f) == 8
    # With a threshold above every piece, the largest (first on a tie) still stays.
    kept_v, kept_f = drop_floaters(verts, faces, min_fraction=0.9)
    assert len(kept_f) == 4 and torch.equal(kept_v, verts[:4])
    with pytest.raises(ValueError, match="min_fraction"):
        drop_floaters(verts, faces, min_fraction=1.5)

"""Fixtures of the protocol tests."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from .samples import MESHES


@pytest.fixture(scope="session")
def spot_mesh() -> tuple[np.ndarray, np.ndarray, bytes]:
    """(positions f4 [N,3], faces i4 [M,3], texture PNG bytes) of the real spot mesh."""
    mesh = trimesh.load(MESHES / "spot.obj", process=False, force="mesh")
    verts_nx3 = np.asarray(mesh.vertices, dtype="<f4")
    faces_mx3 = np.asarray(mesh.faces, dtype="<i4")
    return verts_nx3, faces_mx3, (MESHES / "spot_texture.png").read_bytes()

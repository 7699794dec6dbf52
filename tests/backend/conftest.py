"""Fixtures shared by the backend tests."""

from __future__ import annotations

from pathlib import Path

import pytest

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"


@pytest.fixture(scope="session")
def suzanne_obj(tmp_path_factory) -> Path:
    """The shared suzanne, fan-triangulated (oracle models take triangles only)."""
    from backend.export import write_obj
    from backend.meshio import load_mesh

    mesh = load_mesh(MESHES / "suzanne.obj", triangulate=True)
    path = tmp_path_factory.mktemp("meshes") / "suzanne_tri.obj"
    write_obj(path, mesh.verts_vx3, mesh.faces_fx3)
    return path

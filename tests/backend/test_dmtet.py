"""DMTet: the tetrahedral grid, marching tetrahedra on analytic SDFs, gradients, and a small fit
through the rasteriser."""

from __future__ import annotations

import math

import pytest
import torch

from backend.cameras import SCENE_BOUND, Cameras
from backend.dmtet import DMTet, SphereSDF, TetGrid, extract_mesh_from_sdf, marching_tetrahedra
from backend.raster import TorchRasterizer, render_mesh


class BoxSDF:
    """Exact SDF of the axis-aligned box [-half, half]^3."""

    def __init__(self, half_3: tuple[float, float, float]) -> None:
        self.half_3 = torch.tensor(half_3)

    def sdf(self, x_nx3: torch.Tensor) -> torch.Tensor:
        q = x_nx3.abs() - self.half_3.to(x_nx3)
        return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


def edge_use_counts(faces_fx3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each undirected edge is used, and how often each directed edge is used."""
    faces = faces_fx3.long()
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected, _ = directed.sort(dim=1)
    _, undirected_counts = torch.unique(undirected, dim=0, return_counts=True)
    _, directed_counts = torch.unique(directed, dim=0, return_counts=True)
    return undirected_counts, directed_counts


def signed_volume(verts_vx3: torch.Tensor, faces_fx3: torch.Tensor) -> torch.Tensor:
    a, b, c = (verts_vx3[faces_fx3.long()[:, i]] for i in range(3))
    return (a * torch.linalg.cross(b, c)).sum() / 6


def assert_clean_closed_mesh(verts_vx3: torch.Tensor, faces_fx3: torch.Tensor, allow_slivers: bool = False) -> None:
    assert faces_fx3.dtype == torch.int32 and verts_vx3.dtype == torch.float32
    assert faces_fx3.shape[0] > 0
    undirected, directed = edge_use_counts(faces_fx3)
    assert torch.all(undirected == 2), "every edge must be shared by exactly two faces"
    assert torch.all(directed == 1), "neighbouring faces must be consistently oriented"
    assert torch.unique(faces_fx3.long()).numel() == verts_vx3.shape[0], "no unused vertices"
    corners = faces_fx3.long()
    a_id, b_id, c_id = corners.unbind(-1)
    assert torch.all((a_id != b_id) & (b_id != c_id) & (c_id != a_id)), "no repeated corners"
    a, b, c = (verts_vx3[corners[:, i]] for i in range(3))
    zero_area = torch.linalg.cross(b - a, c - a).norm(dim=-1) == 0
    # Collinear slivers only appear where the surface runs exactly through grid vertices.
    assert zero_area.float().mean() <= (0.01 if allow_slivers else 0.0)
    # No two output vertices at the same place: crossings of shared edges are merged.
    assert torch.unique(verts_vx3, dim=0).shape[0] == verts_vx3.shape[0]


# ----------------------------------------------------------------------------------------------
# The grid.


def test_grid_tets_have_positive_volume_and_fill_the_cube():
    grid = TetGrid(4)
    tets = grid.all_tets()
    assert tets.shape == (grid.num_tets, 4) and grid.num_vertices == 125
    p = grid.positions(tets.reshape(-1)).reshape(-1, 4, 3).double()
    volumes = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    cell_volume = grid.cell_size**3
    assert torch.allclose(volumes, torch.full_like(volumes, cell_volume / 6))
    assert math.isclose(volumes.sum().item(), (2 * SCENE_BOUND) ** 3, rel_tol=1e-9)
    # Conforming: an interior triangle is shared by exactly two tets, a boundary one lies on the
    # cube's surface and belongs to one.
    faces = torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]])
    unique_faces, counts = torch.unique(faces.sort(dim=1).values, dim=0, return_counts=True)
    assert counts.max() == 2
    boundary = grid.positions(unique_faces[counts == 1].reshape(-1)).reshape(-1, 3, 3)
    on_side = (boundary.abs() == SCENE_BOUND).all(dim=1).any(dim=-1)
    assert torch.all(on_side)


def test_grid_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution .*0"):
        TetGrid(0)
    with pytest.raises(ValueError, match="resolution .*'64'"):
        TetGrid("64")


# ----------------------------------------------------------------------------------------------
# Marching tetrahedra.


@pytest.mark.parametrize("resolution", [8, 24])
def test_sphere_extracts_a_closed_outward_mesh_on_the_sphere(resolution):
    radius = 0.5  # at resolution 8 grid vertices lie exactly on the sphere (SDF == 0)
    verts, faces = DMTet.from_sdf(SphereSDF(radius), resolution, "cpu").extract()
    assert_clean_closed_mesh(verts.detach(), faces)
    cell = 2 * SCENE_BOUND / resolution
    assert (verts.norm(dim=-1) - radius).abs().max() < 0.2 * cell
    volume = signed_volume(verts.detach(), faces)
    assert 0.85 * (4 / 3) * math.pi * radius**3 < volume < (4 / 3) * math.pi * radius**3


def test_random_fields_give_closed_consistently_wound_meshes():
    generator = torch.Generator().manual_seed(0)
    grid = TetGrid(10)
    positions = grid.positions(torch.arange(grid.num_vertices))
    for _ in range(3):
        sdf = torch.randn(grid.num_vertices, generator=generator)
        sdf[positions.abs().amax(-1) > 0.7] = 1.0  # keep the surface away from the grid border
        verts, faces = marching_tetrahedra(grid, sdf)
        assert_clean_closed_mesh(verts, faces)
        assert signed_volume(verts, faces) > 0


def test_box_sdf_through_the_plain_helper():
    half = (0.4, 0.3, 0.2)
    verts, faces = extract_mesh_from_sdf(BoxSDF(half).sdf, 20, "cpu")
    assert not verts.requires_grad
    assert_clean_closed_mesh(verts, faces, allow_slivers=True)  # the box's faces lie on grid planes
    cell = 2 * SCENE_BOUND / 20
    extent = verts.abs().amax(0)
    assert torch.all((extent - torch.tensor(half)).abs() < cell)
    assert math.isclose(signed_volume(verts, faces).item(), 8 * 0.4 * 0.3 * 0.2, rel_tol=0.15)


def test_a_field_without_a_surface_gives_an_empty_mesh():
    grid = TetGrid(4)
    for sdf in (torch.ones(grid.num_vertices), -torch.ones(grid.num_vertices)):
        verts, faces = marching_tetrahedra(grid, sdf)
        assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int32


def test_only_surface_cubes_are_visited():
    grid = TetGrid(32)
    sdf = SphereSDF(0.3).sdf(grid.positions(torch.arange(grid.num_vertices)))
    cubes = grid.surface_cubes(sdf < 0)
    assert 0 < cubes.shape[0] < 0.1 * grid.resolution**3
    centres = grid.positions(grid.vertex_ids(*cubes.T)) + grid.cell_size / 2
    assert ((centres.norm(dim=-1) - 0.3).abs() < grid.cell_size).all()


@pytest.mark.parametrize("resolution", [64, 128])
def test_production_resolutions_build_and_extract(resolution):
    dmtet = DMTet.from_sdf(SphereSDF(0.45), resolution, "cpu", chunk=1 << 20)
    assert dmtet.sdf.shape == ((resolution + 1) ** 3,)
    verts, faces = dmtet.extract()
    assert (verts.detach().norm(dim=-1) - 0.45).abs().max() < 0.2 * dmtet.grid.cell_size
    assert faces.shape[0] > 1000 * (resolution // 64) ** 2


# ----------------------------------------------------------------------------------------------
# Gradients.


def test_gradients_reach_sdf_and_deform():
    dmtet = DMTet.from_sdf(SphereSDF(0.4), 12, "cpu")
    verts, _ = dmtet.extract()
    weights = torch.randn_like(verts)
    (verts * weights).sum().backward()
    assert (dmtet.sdf.grad != 0).sum() > 50 and (dmtet.deform.grad != 0).sum() > 50
    # Only vertices next to the surface get gradients.
    grid_sdf = SphereSDF(0.4).sdf(dmtet.grid.positions(torch.arange(dmtet.grid.num_vertices)))
    far_away = grid_sdf.abs() > 2 * dmtet.grid.cell_size
    assert torch.all(dmtet.sdf.grad[far_away] == 0)


def test_sdf_gradient_matches_finite_differences():
    dmtet = DMTet.from_sdf(SphereSDF(0.37), 10, "cpu")
    weights = torch.randn(10000, 3, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        verts, _ = dmtet.extract()
        return (verts * weights[: verts.shape[0]]).sum()

    loss().backward()
    grad = dmtet.sdf.grad.clone()
    eps = 1e-3
    for vertex in torch.nonzero(grad.abs() > 1e-3).squeeze(-1)[:5].tolist():
        with torch.no_grad():
            dmtet.sdf[vertex] += eps
            plus = loss()
            dmtet.sdf[vertex] -= 2 * eps
            minus = loss()
            dmtet.sdf[vertex] += eps
        assert math.isclose(grad[vertex].item(), ((plus - minus) / (2 * eps)).item(), rel_tol=2e-2, abs_tol=1e-3)


def test_deformation_is_bounded_by_one_cell():
    dmtet = DMTet.from_sdf(SphereSDF(0.4), 8, "cpu")
    with torch.no_grad():
        dmtet.deform.fill_(100.0)
    ids = torch.arange(dmtet.grid.num_vertices)
    moved = dmtet.vertex_positions(ids) - dmtet.grid.positions(ids)
    assert torch.allclose(moved, torch.full_like(moved, dmtet.grid.cell_size))


def test_from_sdf_validates_the_field():
    with pytest.raises(TypeError, match="field must have a callable .sdf.*str"):
        DMTet.from_sdf("sphere", 8, "cpu")

    class WrongShape:
        def sdf(self, x_nx3):
            return torch.zeros(x_nx3.shape[0], 2)

    with pytest.raises(ValueError, match=r"field.sdf returned \(729, 2\) for 729 points"):
        DMTet.from_sdf(WrongShape(), 8, "cpu")


# ----------------------------------------------------------------------------------------------
# Fitting through the rasteriser.


def iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    a, b = mask_a > 0.5, mask_b > 0.5
    return ((a & b).sum() / (a | b).sum()).item()


def orbit_cameras(size: int) -> Cameras:
    elevations = torch.tensor([0.0, 0.0, 0.0, 0.0, 60.0, -60.0])
    azimuths = torch.tensor([0.0, 90.0, 180.0, 270.0, 45.0, 225.0])
    return Cameras.from_orbit(elevations, azimuths, torch.full((6,), 2.5), torch.full((6,), 40.0), size, size)


@pytest.mark.parametrize("target_radius, start_radius", [(0.5, 0.3), (0.3, 0.5)], ids=["grow", "shrink"])
def test_fit_to_rendered_masks_and_depth(target_radius, start_radius):
    cams = orbit_cameras(32)
    rasterizer = TorchRasterizer()
    target_verts, target_faces = extract_mesh_from_sdf(SphereSDF(target_radius).sdf, 32, "cpu")
    target = render_mesh(rasterizer, target_verts, target_faces, cams)
    target_hit = target.rast[..., 3:4] > 0

    dmtet = DMTet.from_sdf(SphereSDF(start_radius), 16, "cpu")
    optimizer = torch.optim.Adam(dmtet.parameters(), lr=1e-2)
    for step in range(30):
        # 1. Extract, 2. render, 3. antialiased-mask loss plus depth where both cover, 4. step.
        verts, faces = dmtet.extract()
        render = render_mesh(rasterizer, verts, faces, cams)
        if step == 0:
            first_iou = iou(render.mask, target.mask)
        both = (render.rast[..., 3:4] > 0) & target_hit
        depth_loss = ((render.depth - target.depth).abs() * both).sum() / both.sum()
        loss = 10 * (render.mask - target.mask).square().mean() + depth_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    verts, faces = dmtet.extract()
    final_iou = iou(render_mesh(rasterizer, verts, faces, cams).mask, target.mask)
    assert first_iou < 0.4 and final_iou > 0.85
    assert (verts.detach().norm(dim=-1).mean() - target_radius).abs() < 0.05


def test_a_mask_loss_alone_reaches_sdf_and_deform_through_the_silhouette():
    cams = orbit_cameras(24)
    dmtet = DMTet.from_sdf(SphereSDF(0.4), 12, "cpu")
    verts, faces = dmtet.extract()
    render = render_mesh(TorchRasterizer(), verts, faces, cams)
    render.mask.sum().backward()  # d(coverage): only the silhouette edges move it
    assert (dmtet.sdf.grad != 0).sum() > 20 and (dmtet.deform.grad != 0).sum() > 20
    # Growing the shape grows the covered area: the gradient says so.
    inside_ids = torch.nonzero(dmtet.sdf.detach() < 0).squeeze(-1)
    outside_near = torch.nonzero((dmtet.sdf.detach() > 0) & (dmtet.sdf.grad != 0)).squeeze(-1)
    assert inside_ids.numel() > 0 and (dmtet.sdf.grad[outside_near] < 0).float().mean() > 0.9


def test_the_grid_around_a_surface_hugs_its_bounding_box():
    """An off-centre box inside the scene cube: the grid is the cube around its bounding box,
    padded by 10 % of the longest side on each side, so every cell spans the object."""
    half, centre = (0.3, 0.2, 0.1), torch.tensor([0.2, -0.1, 0.05])
    box = BoxSDF(half)
    field = type("Shifted", (), {"sdf": staticmethod(lambda x: box.sdf(x - centre))})()
    dmtet = DMTet.from_sdf(field, 32, "cpu", padding=0.1)
    grid = dmtet.grid
    assert grid.bound == pytest.approx(0.6 * 1.2 / 2, rel=0.05)
    assert torch.allclose(torch.tensor(grid.centre), centre, atol=0.03)
    assert grid.cell_size < 0.5 * TetGrid(32).cell_size
    verts, faces = dmtet.extract()
    assert_clean_closed_mesh(verts.detach(), faces)
    low, high = verts.min(0).values, verts.max(0).values
    assert torch.allclose(high - low, 2 * torch.tensor(half), atol=2 * grid.cell_size)


def test_a_field_without_surface_keeps_the_whole_cube():
    dmtet = DMTet.from_sdf(SphereSDF(5.0), 8, "cpu", padding=0.1)
    assert dmtet.grid.bound == 1.0 and dmtet.grid.centre == (0.0, 0.0, 0.0)

"""The rasteriser: the PyTorch twin against hand-computed and analytic results, and (on a GPU
box) against nvdiffrast. Run the GPU part with `pytest -m cuda tests/backend/test_raster.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from backend.cameras import Cameras
from backend.nvdiffrast_loader import NvdiffrastUnavailable, load_nvdiffrast, nvdiffrast_installed
from backend.raster import (
    NvdiffrastRasterizer,
    TorchRasterizer,
    edge_neighbours,
    face_normals,
    get_rasterizer,
    render_mesh,
    vertex_normals,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def orbit(elevations, azimuths, size, distance=2.5, fov=40.0, dtype=torch.float32) -> Cameras:
    count = len(elevations)
    return Cameras.from_orbit(
        torch.tensor(elevations, dtype=dtype),
        torch.tensor(azimuths, dtype=dtype),
        torch.full((count,), distance, dtype=dtype),
        torch.full((count,), fov, dtype=dtype),
        size,
        size,
    )


def pixel_centres_ndc(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """NDC (x, y) of every pixel centre, [H, W] each, row 0 at the top."""
    x = (2 * np.arange(width) + 1) / width - 1
    y = 1 - (2 * np.arange(height) + 1) / height
    return np.meshgrid(x, y, indexing="xy")


def inside_triangle_2d(x, y, tri_3x2) -> np.ndarray:
    """Strictly-inside test by same-sign edge functions (independent of the rasteriser)."""
    signs = []
    for i in range(3):
        (ax, ay), (bx, by) = tri_3x2[i], tri_3x2[(i + 1) % 3]
        signs.append((bx - ax) * (y - ay) - (by - ay) * (x - ax))
    signs = np.stack(signs)
    return (signs > 0).all(0) | (signs < 0).all(0)


def box_mesh(half: float) -> tuple[torch.Tensor, torch.Tensor]:
    box = trimesh.creation.box(extents=(2 * half,) * 3)
    assert box.is_winding_consistent and box.volume > 0
    return torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces, dtype=torch.int32)


def ray_box(origins, dirs, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic slab test: hit mask and entry distance for the box [-half, half]^3."""
    inv = 1.0 / dirs
    t0, t1 = (-half - origins) * inv, (half - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    return (t_near < t_far) & (t_far > 0), t_near


# ----------------------------------------------------------------------------------------------
# A single triangle by hand.


def test_single_triangle_coverage_barycentrics_and_depth():
    height = width = 9
    tri_3x2 = np.array([[-0.65, -0.45], [0.55, -0.55], [0.1, 1.0]])  # centroid (0, 0): pixel (4, 4)
    clip = torch.tensor([[[x, y, 0.25, 1.0] for x, y in tri_3x2]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = TorchRasterizer().rasterize(clip, faces, height, width)

    assert rast.shape == (1, height, width, 4)
    x, y = pixel_centres_ndc(height, width)
    expected = inside_triangle_2d(x, y, tri_3x2)
    assert expected.sum() > 10
    assert np.array_equal(rast[0, ..., 3].numpy() == 1, expected)
    assert torch.all(rast[0][~torch.from_numpy(expected)] == 0)  # empty pixels are all zero
    assert torch.allclose(rast[0, 4, 4, :2], torch.tensor([1 / 3, 1 / 3]), atol=1e-6)
    assert torch.allclose(rast[0, ..., 2][torch.from_numpy(expected)], torch.tensor(0.25))


def test_barycentrics_are_perspective_correct():
    tri_3x2 = np.array([[-0.6, -0.5], [0.6, -0.5], [0.0, 1.0]])
    w_3 = torch.tensor([1.0, 2.0, 4.0])
    clip = torch.stack([torch.tensor(tri_3x2[:, 0]) * w_3, torch.tensor(tri_3x2[:, 1]) * w_3,
                        0.5 * w_3, w_3], dim=-1).float()[None]
    rast = TorchRasterizer().rasterize(clip, torch.tensor([[0, 1, 2]], dtype=torch.int32), 9, 9)
    # Screen-space barycentrics are 1/3 each at the centroid; perspective-correct ones weigh 1/w.
    expected = (1 / w_3) / (1 / w_3).sum()
    assert torch.allclose(rast[0, 4, 4, :2], expected[:2], atol=1e-6)
    assert torch.isclose(rast[0, 4, 4, 2], torch.tensor(0.5), atol=1e-6)


def test_row_zero_is_the_top_of_the_image():
    clip = torch.tensor([[[-0.5, 0.2, 0, 1], [0.5, 0.2, 0, 1], [0.0, 0.9, 0, 1]]], dtype=torch.float32)
    rast = TorchRasterizer().rasterize(clip, torch.tensor([[0, 1, 2]], dtype=torch.int32), 16, 16)
    rows = torch.nonzero(rast[0, ..., 3] > 0)[:, 0]
    assert rows.numel() > 0 and rows.max() < 8
    # With real cameras: a point above the origin (+Z) appears in the upper half.
    cams = orbit([0.0], [30.0], 32)
    verts, faces = box_mesh(0.1)
    render = render_mesh(TorchRasterizer(), verts + torch.tensor([0.0, 0.0, 0.5]), faces, cams)
    assert torch.nonzero(render.rast[0, ..., 3] > 0)[:, 0].max() < 16


def test_nearest_triangle_wins_whatever_the_order():
    near = [[-0.8, -0.8, -0.5, 1], [0.8, -0.8, -0.5, 1], [0.0, 0.8, -0.5, 1]]
    far = [[-0.9, -0.9, 0.5, 1], [0.9, -0.9, 0.5, 1], [0.0, 0.9, 0.5, 1]]
    rasterizer = TorchRasterizer()
    for first, second, near_id in ((near, far, 1), (far, near, 2)):
        clip = torch.tensor([first + second], dtype=torch.float32)
        faces = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
        rast = rasterizer.rasterize(clip, faces, 16, 16)
        ids = rast[0, ..., 3]
        centre = rast[0, 8, 8]
        assert centre[3] == near_id and torch.isclose(centre[2], torch.tensor(-0.5))
        assert set(ids.unique().tolist()) == {0.0, 1.0, 2.0}  # the far one shows around the rim


def test_shared_edge_pixels_are_covered_exactly_once_by_the_fill_rule():
    # Two triangles of a square split along the diagonal through pixel centres (4x4 image:
    # the diagonal x = y passes through the centres of pixels (r, 3 - r)).
    quad = torch.tensor([[[-1, -1, 0, 1], [1, -1, 0, 1], [1, 1, 0, 1], [-1, 1, 0, 1]]], dtype=torch.float32)
    rasterizer = TorchRasterizer()
    for faces in ([[0, 1, 2], [0, 2, 3]], [[0, 2, 3], [0, 1, 2]]):
        rast = rasterizer.rasterize(quad, torch.tensor(faces, dtype=torch.int32), 4, 4)
        assert torch.all(rast[0, ..., 3] > 0)  # no holes
        # Each triangle alone: the diagonal pixels go to exactly one of them.
        alone = [
            rasterizer.rasterize(quad, torch.tensor([face], dtype=torch.int32), 4, 4)[0, ..., 3] > 0
            for face in faces
        ]
        assert torch.all(alone[0] ^ alone[1])


def test_triangles_behind_the_camera_or_beyond_the_planes_are_dropped():
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    behind = torch.tensor([[[-0.5, -0.5, 0, -1], [0.5, -0.5, 0, -1], [0, 0.5, 0, -1]]], dtype=torch.float32)
    too_far = torch.tensor([[[-0.5, -0.5, 1.5, 1], [0.5, -0.5, 1.5, 1], [0, 0.5, 1.5, 1]]], dtype=torch.float32)
    for clip in (behind, too_far):
        assert torch.all(TorchRasterizer().rasterize(clip, faces, 8, 8) == 0)


def test_ground_plane_through_the_camera_plane_matches_ray_casting():
    # A huge quad whose corners lie behind the camera (w < 0): clipped at the near plane.
    half, ground_z = 50.0, -0.3
    verts = torch.tensor([[-half, -half, ground_z], [half, -half, ground_z], [half, half, ground_z],
                          [-half, half, ground_z]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    cams = orbit([10.0, 35.0], [0.0, 120.0], 48, distance=2.0, fov=60.0)
    near, far = 0.1, 20.0
    render = render_mesh(TorchRasterizer(), verts, faces, cams, near=near, far=far)
    origins, dirs = cams.rays()
    t = (ground_z - origins[..., 2]) / dirs[..., 2]
    forward = -cams.c2w_bx4x4[:, :3, 2]
    view_depth = t * (dirs * forward[:, None, None]).sum(-1)
    expected = (t > 0) & (view_depth >= near) & (view_depth <= far)
    got = render.rast[..., 3] > 0
    assert 0.2 < expected.float().mean() < 0.9
    assert (got == expected).float().mean() > 0.998
    both = got & expected
    assert torch.allclose(render.depth[..., 0][both], view_depth[both], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Interpolation and gradients.


def test_interpolate_constant_and_linear_attributes_exactly():
    cams = orbit([20.0, -30.0], [30.0, 200.0], 24)
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int32)
    rasterizer = TorchRasterizer()
    mvp = cams.mvp_bx4x4()
    clip = torch.einsum("bij,vj->bvi", mvp, torch.cat([verts, torch.ones_like(verts[:, :1])], -1))
    rast = rasterizer.rasterize(clip, faces, 24, 24)
    hit = rast[..., 3] > 0
    # Constant: exactly the constant on covered pixels, zero elsewhere.
    constant = rasterizer.interpolate(torch.full((verts.shape[0], 2), 3.5), rast, faces)
    assert torch.allclose(constant[hit], torch.tensor(3.5)) and torch.all(constant[~hit] == 0)
    # Linear in clip space: the interpolated clip position projects onto the pixel centre.
    clip_px = rasterizer.interpolate(clip, rast, faces)
    x, y = pixel_centres_ndc(24, 24)
    ndc = clip_px[..., :2] / clip_px[..., 3:4].clamp(min=1e-6)
    assert torch.allclose(ndc[..., 0][hit], torch.from_numpy(x).float().expand(2, -1, -1)[hit], atol=1e-5)
    assert torch.allclose(ndc[..., 1][hit], torch.from_numpy(y).float().expand(2, -1, -1)[hit], atol=1e-5)
    assert torch.allclose(clip_px[..., 2][hit] / clip_px[..., 3][hit], rast[..., 2][hit], atol=1e-5)
    # [V, C] and [B, V, C] attributes agree.
    batched = rasterizer.interpolate(verts.expand(2, -1, -1), rast, faces)
    assert torch.allclose(batched, rasterizer.interpolate(verts, rast, faces))


def test_gradient_of_interpolated_attributes_matches_finite_differences():
    torch.manual_seed(0)
    dtype = torch.float64
    clip = torch.tensor([[[-0.7, -0.6, 0.1, 1.0], [0.8, -0.5, 0.3, 1.6], [0.1, 0.9, -0.2, 0.8],
                          [0.9, 0.8, 0.5, 1.2]]], dtype=dtype)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]], dtype=torch.int32)
    attr = torch.randn(4, 3, dtype=dtype)
    weights = torch.randn(1, 12, 12, 3, dtype=dtype)
    rasterizer = TorchRasterizer()

    def loss(c):
        return (rasterizer.interpolate(attr, rasterizer.rasterize(c, faces, 12, 12), faces) * weights).sum()

    clip_var = clip.clone().requires_grad_(True)
    loss(clip_var).backward()
    eps = 1e-6
    for vertex in range(4):
        for coord in range(4):
            if coord == 2:
                continue  # z only moves the depth, not the interpolated attribute
            plus, minus = clip.clone(), clip.clone()
            plus[0, vertex, coord] += eps
            minus[0, vertex, coord] -= eps
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
            assert torch.isclose(clip_var.grad[0, vertex, coord], numeric, rtol=1e-4, atol=1e-6), (vertex, coord)
    assert clip_var.grad.abs().sum() > 0


def test_chunked_visibility_equals_single_pass():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int32)
    cams = orbit([15.0, 60.0], [10.0, 250.0], 40)
    whole = render_mesh(TorchRasterizer(), verts, faces, cams)
    chunked = render_mesh(TorchRasterizer(pairs_per_chunk=5000), verts, faces, cams)
    assert torch.equal(whole.rast, chunked.rast)


# ----------------------------------------------------------------------------------------------
# The twin's silhouette antialiasing.


def antialiased_mask(rasterizer, clip, faces, size):
    rast = rasterizer.rasterize(clip, faces, size, size)
    return rasterizer.antialias((rast[..., 3:4] > 0).to(clip.dtype), rast, clip, faces)


def test_antialias_gradient_matches_finite_differences():
    dtype = torch.float64
    clip = torch.tensor([[[-0.63, -0.52, 0.1, 1.0], [0.71, -0.44, 0.2, 1.3], [0.05, 0.83, 0.0, 0.9]]], dtype=dtype)
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rasterizer = TorchRasterizer()
    weights = torch.rand(1, 32, 32, 1, dtype=dtype, generator=torch.Generator().manual_seed(0))
    clip_var = clip.clone().requires_grad_(True)
    (antialiased_mask(rasterizer, clip_var, faces, 32) * weights).sum().backward()
    assert clip_var.grad[..., [0, 1, 3]].abs().min() > 1.0  # every x, y, w moves the silhouette
    eps = 1e-6
    for vertex in range(3):
        for coord in (0, 1, 3):
            plus, minus = clip.clone(), clip.clone()
            plus[0, vertex, coord] += eps
            minus[0, vertex, coord] -= eps
            difference = antialiased_mask(rasterizer, plus, faces, 32) - antialiased_mask(rasterizer, minus, faces, 32)
            numeric = (difference * weights).sum() / (2 * eps)
            assert torch.isclose(clip_var.grad[0, vertex, coord], numeric, rtol=1e-5), (vertex, coord)


def test_antialiased_coverage_estimates_area_better_than_binary():
    generator = torch.Generator().manual_seed(3)
    rasterizer = TorchRasterizer()
    size, binary_error, aa_error, tested = 24, 0.0, 0.0, 0
    while tested < 20:
        xy = torch.rand(3, 2, generator=generator) * 1.8 - 0.9
        clip = torch.cat([xy, torch.zeros(3, 1), torch.ones(3, 1)], dim=-1)[None]
        faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
        a, b = xy[1] - xy[0], xy[2] - xy[0]
        area_px = (a[0] * b[1] - a[1] * b[0]).abs() / 2 * size * size / 4
        if area_px < 40:
            continue  # the pairwise estimate is poor for triangles of a few pixels (as nvdiffrast's)
        tested += 1
        rast = rasterizer.rasterize(clip, faces, size, size)
        binary_error += ((rast[..., 3] > 0).sum() - area_px).abs().item()
        aa_error += (antialiased_mask(rasterizer, clip, faces, size).sum() - area_px).abs().item()
    assert aa_error < 0.4 * binary_error


def test_antialias_touches_only_pixels_next_to_the_silhouette():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int32)
    render = render_mesh(TorchRasterizer(), verts, faces, orbit([20.0], [40.0], 48))
    covered = (render.rast[..., 3] > 0).float()
    padded = torch.nn.functional.pad(covered, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    interior = (covered == 1) & (neighbours == 4)
    far_outside = (covered == 0) & (neighbours == 0)
    mask = render.mask[..., 0]
    assert torch.all(mask[interior] == 1) and torch.all(mask[far_outside] == 0)
    rim = ~(interior | far_outside)
    assert (mask[rim] != covered[rim]).sum() >= 5
    assert mask.min() >= 0 and mask.max() <= 1


def test_edge_neighbours_pair_faces_across_shared_edges():
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [4, 5, 6]], dtype=torch.int32)
    expected = torch.tensor([[-1, 1, 2], [-1, 2, 0], [-1, 0, 1], [-1, -1, -1]])
    assert torch.equal(edge_neighbours(faces), expected)
    closed = trimesh.creation.icosphere(subdivisions=1)
    assert torch.all(edge_neighbours(torch.tensor(closed.faces)) >= 0)


# ----------------------------------------------------------------------------------------------
# render_mesh against analytic shapes.


def test_box_mask_depth_and_normals_match_ray_casting():
    half = 0.4
    verts, faces = box_mesh(half)
    cams = orbit([25.0, -40.0, 0.0], [35.0, 160.0, 0.0], 48)
    render = render_mesh(TorchRasterizer(), verts, faces, cams, smooth_normals=False)
    origins, dirs = cams.rays()
    hit, t = ray_box(origins, dirs, half)
    got = render.rast[..., 3] > 0
    assert (got == hit).float().mean() > 0.999  # only pixel centres exactly on an edge may differ
    both = got & hit
    forward = -cams.c2w_bx4x4[:, :3, 2]
    expected_depth = t * (dirs * forward[:, None, None]).sum(-1)
    assert torch.allclose(render.depth[..., 0][both], expected_depth[both], atol=1e-4)
    assert torch.allclose(render.xyz[both], (origins + t[..., None] * dirs)[both], atol=1e-4)
    assert torch.all(render.depth[~got] == 0) and torch.all(render.xyz[~got] == 0)
    # Face normals of a box are the axis of the face hit: the largest |coordinate| of the point.
    point = render.xyz[both]
    axis = point.abs().argmax(-1)
    expected_normal = torch.nn.functional.one_hot(axis, 3).float() * point.gather(-1, axis[:, None]).sign()
    assert torch.allclose(render.normal[both], expected_normal, atol=1e-5)


def test_sphere_mask_and_smooth_normals_match_the_analytic_sphere():
    radius = 0.45
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int32)
    cams = orbit([0.0, 50.0], [0.0, 100.0], 64)
    render = render_mesh(TorchRasterizer(), verts, faces, cams, vertex_attrs=verts * 2)
    origins, dirs = cams.rays()
    b = (origins * dirs).sum(-1)
    disc = b * b - ((origins * origins).sum(-1) - radius**2)
    got = render.rast[..., 3] > 0
    assert (got == (disc > 0)).float().mean() > 0.995  # the inscribed mesh loses a thin rim
    assert torch.allclose(render.attrs, render.xyz * 2, atol=1e-6)
    normal_error = (render.normal[got] - torch.nn.functional.normalize(render.xyz[got], dim=-1)).norm(dim=-1)
    assert normal_error.max() < 0.05


def test_an_empty_mesh_renders_empty_buffers():
    cams = orbit([0.0], [0.0], 8)
    render = render_mesh(TorchRasterizer(), torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int32), cams,
                         vertex_attrs=torch.zeros(0, 2))
    for buffer in (render.mask, render.depth, render.normal, render.xyz, render.rast, render.attrs):
        assert buffer.shape[:3] == (1, 8, 8) and torch.all(buffer == 0)


def test_vertex_and_face_normals_point_outwards():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.int32)
    assert torch.allclose(vertex_normals(verts, faces), verts, atol=0.05)
    centres = verts[faces.long()].mean(1)
    assert ((face_normals(verts, faces) * centres).sum(-1) > 0.9).all()


# ----------------------------------------------------------------------------------------------
# Selection, validation and the loader.


def test_get_rasterizer_choice_and_errors(monkeypatch):
    monkeypatch.delenv("DREAMLOOM_RASTERIZER", raising=False)
    assert isinstance(get_rasterizer("cpu"), TorchRasterizer)
    assert isinstance(get_rasterizer("cpu", kind="torch"), TorchRasterizer)
    monkeypatch.setenv("DREAMLOOM_RASTERIZER", "torch")
    assert isinstance(get_rasterizer("cuda"), TorchRasterizer)
    with pytest.raises(ValueError, match="nvdiffrast.*device=cpu"):
        get_rasterizer("cpu", kind="nvdiffrast")
    with pytest.raises(ValueError, match="'opengl'"):
        get_rasterizer("cpu", kind="opengl")
    with pytest.raises(ValueError, match="CUDA device"):
        NvdiffrastRasterizer("cpu")


def test_bad_inputs_name_the_field():
    rasterizer = TorchRasterizer()
    clip = torch.zeros(1, 3, 4)
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"clip_bxvx4 .*\(3, 4\)"):
        rasterizer.rasterize(clip[0], faces, 8, 8)
    with pytest.raises(ValueError, match="faces_fx3 .*float32"):
        rasterizer.rasterize(clip, faces.float(), 8, 8)
    with pytest.raises(ValueError, match=r"faces_fx3 holds vertex ids in \[0, 7\]"):
        rasterizer.rasterize(clip, torch.tensor([[0, 1, 7]], dtype=torch.int32), 8, 8)
    with pytest.raises(ValueError, match="height .*0"):
        rasterizer.rasterize(clip, faces, 0, 8)
    rast = rasterizer.rasterize(clip, faces, 8, 8)
    with pytest.raises(ValueError, match=r"attr .*\(2, 3, 2\)"):
        rasterizer.interpolate(torch.zeros(2, 3, 2), rast, faces)


def test_importing_the_modules_and_choosing_loads_no_nvdiffrast():
    code = (
        "import sys, torch\n"
        "import backend.raster, backend.dmtet\n"
        "backend.raster.get_rasterizer('cpu')\n"
        "assert 'nvdiffrast' not in sys.modules, sorted(m for m in sys.modules if 'nvdiffrast' in m)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(nvdiffrast_installed(), reason="nvdiffrast is installed here")
def test_missing_nvdiffrast_error_says_how_to_install():
    with pytest.raises(NvdiffrastUnavailable, match=r"pip install diffrp-nvdiffrast==0\.3\.3\.1"):
        load_nvdiffrast()


# ----------------------------------------------------------------------------------------------
# The twin against nvdiffrast (GPU box only).


def _spot_scene(device):
    from backend.meshio import load_mesh, normalize_to_unit_box

    mesh = load_mesh(SHARED / "meshes" / "spot.obj")
    verts, _, _ = normalize_to_unit_box(mesh.verts_vx3)
    verts = torch.tensor(verts, dtype=torch.float32, device=device)
    faces = torch.tensor(mesh.faces_fx3, dtype=torch.int32, device=device)
    cams = orbit([10.0, 40.0, -20.0, 70.0], [0.0, 75.0, 190.0, 300.0], 256, distance=1.8).to(device)
    return verts, faces, cams


def compare_twin_with(reference, device) -> None:
    """Render the spot scene with the twin and `reference`; ids, barycentrics, depth, attributes
    and vertex-position gradients must agree."""
    verts, faces, cams = _spot_scene(device)
    generator = torch.Generator(device=device).manual_seed(0)
    attr = torch.randn(verts.shape[0], 3, device=device, generator=generator)
    results = {}
    for name, rasterizer in (("twin", TorchRasterizer()), ("reference", reference)):
        verts_var = verts.clone().requires_grad_(True)
        render = render_mesh(rasterizer, verts_var, faces, cams, vertex_attrs=attr)
        (render.attrs.sum() + render.depth.sum()).backward()
        results[name] = (render, verts_var.grad)
    twin, twin_grad = results["twin"]
    ref, ref_grad = results["reference"]
    same_id = twin.rast[..., 3] == ref.rast[..., 3]
    assert same_id.float().mean() >= 0.995
    hit = same_id & (twin.rast[..., 3] > 0)
    assert hit.float().mean() > 0.1
    assert torch.allclose(twin.rast[..., :2][hit], ref.rast[..., :2][hit], atol=1e-3)
    assert torch.allclose(twin.depth[hit], ref.depth[hit], atol=1e-3)
    assert torch.allclose(twin.attrs[hit], ref.attrs[hit], atol=1e-3)
    # The twin's silhouette antialiasing follows nvdiffrast's analysis: masks nearly equal.
    assert (twin.mask - ref.mask).abs().mean() < 0.01
    # Gradients w.r.t. vertex positions: the same up to the few pixels whose triangle differs.
    relative = (twin_grad - ref_grad).norm() / ref_grad.norm()
    cosine = torch.nn.functional.cosine_similarity(twin_grad.flatten(), ref_grad.flatten(), dim=0)
    assert relative < 0.05 and cosine > 0.995


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_twin_agrees_with_nvdiffrast_forward_and_gradients():
    device = torch.device("cuda")
    compare_twin_with(NvdiffrastRasterizer(device), device)

"""NeuS: sphere initialisation, rendering of the initial sphere, occupancy skipping, and a short
fit to analytic views of a smaller sphere."""

from __future__ import annotations

import math

import pytest
import torch

from backend.cameras import Cameras, orbit_cameras
from backend.hashgrid import HashGridConfig, triton_available
from backend.neus import (
    FitConfig,
    NeuSConfig,
    NeuSField,
    OccupancyGrid,
    cos_anneal,
    fit_to_images,
    neus_alpha,
    ray_box_bounds,
    render_neus,
    render_rays,
    sample_pixels,
)

TINY_GRID = HashGridConfig(num_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=1.6)


def tiny_field(seed: int = 0, **overrides) -> NeuSField:
    torch.manual_seed(seed)
    return NeuSField(NeuSConfig(grid=TINY_GRID, hidden_dim=32, **overrides), device="cpu")


def closest_approach(cameras: Cameras) -> torch.Tensor:
    """Distance of each pixel's ray from the origin ``[B, H, W]``."""
    origins, dirs = cameras.rays()
    along = (origins * dirs).sum(-1, keepdim=True)
    return (origins - along * dirs).norm(dim=-1)


def test_initial_sdf_is_the_sphere():
    field = tiny_field(sphere_radius=0.4)
    x = torch.rand(500, 3) * 2 - 1
    torch.testing.assert_close(field.sdf(x), x.norm(dim=-1) - 0.4, atol=1e-6, rtol=0)


def test_initial_normals_point_outward():
    field = tiny_field()
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    radii = torch.linspace(0.2, 0.9, 200)[:, None]
    with torch.no_grad():
        sdf, normal = field.sdf_and_normal(directions * radii)
    torch.testing.assert_close(sdf, radii[:, 0] - 0.5, atol=1e-5, rtol=0)
    assert float((normal * directions).sum(-1).min()) > 0.999
    torch.testing.assert_close(normal.norm(dim=-1), torch.ones(200), atol=1e-5, rtol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sphere_radius.*2\.0"):
        NeuSConfig(grid=TINY_GRID, sphere_radius=2.0)
    with pytest.raises(ValueError, match=r"hidden_dim.*0"):
        NeuSConfig(grid=TINY_GRID, hidden_dim=0)
    field = tiny_field()
    with pytest.raises(ValueError, match=r"num_samples.*0"):
        render_rays(field, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"cos_anneal_ratio.*1\.5"):
        render_rays(field, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(3), 4, cos_anneal_ratio=1.5)


def test_ray_box_bounds():
    origins = torch.tensor([[0.0, -4.0, 0.0], [0.0, -4.0, 3.0], [0.2, 0.1, 0.0]])
    dirs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_box_bounds(origins, dirs, 1.0)
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(near[[0, 2]], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(far[[0, 2]], torch.tensor([5.0, 0.8]))


def test_alpha_is_opaque_across_a_sharp_surface_and_zero_when_leaving_it():
    inv_s = torch.tensor(1000.0)
    entering = neus_alpha(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.1]), inv_s, 1.0)
    leaving = neus_alpha(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.1]), inv_s, 1.0)
    far_outside = neus_alpha(torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([0.1]), inv_s, 1.0)
    assert float(entering) > 0.99 and float(leaving) < 1e-3 and float(far_outside) < 1e-3
    assert cos_anneal(0, 100) == 0.0 and cos_anneal(50, 100) == 0.5 and cos_anneal(500, 100) == 1.0
    assert cos_anneal(3, 0) == 1.0


def test_initial_sphere_renders_opaque_inside_its_silhouette():
    field = tiny_field()
    cameras = orbit_cameras(2, 20.0, 3.8, 20.0, 20, 20)
    red = torch.tensor([1.0, 0.0, 0.0])
    with torch.no_grad():
        out = render_neus(field, cameras, red, 48, inv_s=300.0)
    assert out["rgb"].shape == (2, 20, 20, 3) and out["opacity"].shape == (2, 20, 20, 1)
    assert out["depth"].shape == (2, 20, 20, 1) and out["normal"].shape == (2, 20, 20, 3)
    closest = closest_approach(cameras)
    opacity = out["opacity"][..., 0]
    inside, outside = closest < 0.45, closest > 0.56
    assert inside.sum() > 50 and outside.sum() > 50
    assert float(opacity[inside].min()) > 0.98
    assert float(opacity[outside].max()) < 0.02
    # outside the silhouette the background shows
    torch.testing.assert_close(out["rgb"][outside], red.expand(int(outside.sum()), 3), atol=0.02, rtol=0)
    # near the image centre: depth to the front of the sphere, normal facing the camera
    centre = out["depth"][:, 9:11, 9:11, 0]
    assert float((centre - 3.3).abs().max()) < 0.03
    towards_camera = cameras.positions_bx3 / 3.8
    normal = torch.nn.functional.normalize(out["normal"][:, 10, 10], dim=-1)
    assert float((normal * towards_camera).sum(-1).min()) > 0.98
    # the sphere SDF has unit gradient: the eikonal term is ~0 (the finite differences' error
    # on the curved surface, of order (eps / r)^2)
    assert float(out["eikonal"]) < 1e-4


def test_render_neus_matches_render_rays_on_flat_batches():
    field = tiny_field()
    cameras = orbit_cameras(1, 0.0, 3.0, 30.0, 6, 5)
    origins, dirs = cameras.rays()
    with torch.no_grad():
        images = render_neus(field, cameras, torch.zeros(3), 16, chunk_rays=7)
        flat = render_rays(field, origins.reshape(-1, 3), dirs.reshape(-1, 3), torch.zeros(3), 16)
    torch.testing.assert_close(images["rgb"].reshape(-1, 3), flat["rgb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(images["depth"].reshape(-1, 1), flat["depth"], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter_and_learn_sharpness():
    field = tiny_field()
    origins, dirs = orbit_cameras(1, 10.0, 3.8, 20.0, 8, 8).rays()
    out = render_rays(
        field, origins.reshape(-1, 3), dirs.reshape(-1, 3), torch.ones(3), 16, stratified=True,
        generator=torch.Generator().manual_seed(0),
    )
    (out["rgb"].mean() + out["opacity"].mean() + out["eikonal"]).backward()
    for name, parameter in field.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    assert float(field.inv_s.detach()) == pytest.approx(20.0, rel=1e-5)


def test_colour_follows_the_normal_but_its_gradient_never_reaches_the_geometry_through_it():
    field = tiny_field()
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.6
    samples = field.query(x)
    flipped = type(samples)(samples.sdf_n, -samples.gradient_nx3, samples.features_nxk)
    assert float((field.color_of(samples) - field.color_of(flipped)).abs().max()) > 1e-4  # the normal is an input
    # The colour's gradient w.r.t. the SDF gradient (hence the normal) is nothing; w.r.t. the
    # shared features it is not: colour shapes the geometry only the way DreamCraft3D's head does.
    gradient, features = torch.autograd.grad(field.color_of(samples).sum(),
                                             (samples.gradient_nx3, samples.features_nxk), allow_unused=True)
    assert gradient is None and bool(features.abs().sum() > 0)


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    field = tiny_field(init_inv_s=100.0)
    occupancy = OccupancyGrid(resolution=16, device="cpu", update_every=10)
    assert occupancy.occupied_fraction() == 1.0  # conservative before the first update
    assert occupancy.update(field, step=3) is False
    assert occupancy.update(field, step=10) is True
    assert 0.0 < occupancy.occupied_fraction() < 0.5
    assert occupancy.lookup(torch.tensor([[0.5, 0.0, 0.0], [0.95, 0.95, 0.95], [2.0, 0.0, 0.0]])).tolist() == [True, False, False]
    cameras = orbit_cameras(2, 30.0, 3.8, 20.0, 16, 16)
    with torch.no_grad():
        plain = render_neus(field, cameras, torch.ones(3), 48)
        skipping = render_neus(field, cameras, torch.ones(3), 48, occupancy=occupancy)
    assert int(skipping["evaluated"]) < 0.6 * int(plain["evaluated"])
    torch.testing.assert_close(skipping["opacity"], plain["opacity"], atol=0.01, rtol=0)
    torch.testing.assert_close(skipping["rgb"], plain["rgb"], atol=0.01, rtol=0)


def test_sample_pixels_checks_the_image_shape_and_keeps_rays_with_their_pixels():
    cameras = orbit_cameras(2, 0.0, 3.0, 30.0, 4, 4)
    origins, dirs = cameras.rays()
    with pytest.raises(ValueError, match=r"rgba_bxhxwx4.*\(2, 4, 4, 4\).*\(2, 4, 5, 4\)"):
        sample_pixels(origins, dirs, torch.zeros(2, 4, 5, 4), 8, None)
    # RGB = the ray direction, so each sampled pixel must carry its own ray
    rgba = torch.cat([dirs, torch.ones(2, 4, 4, 1)], dim=-1)
    ray_origins, ray_dirs, ray_rgba = sample_pixels(origins, dirs, rgba, 8, torch.Generator().manual_seed(0))
    assert ray_origins.shape == ray_dirs.shape == (8, 3) and ray_rgba.shape == (8, 4)
    torch.testing.assert_close(ray_rgba[:, :3], ray_dirs)


def sphere_views(radius: float, cameras: Cameras, rgb: tuple[float, float, float]) -> torch.Tensor:
    """Analytic RGBA views of a uniformly coloured sphere."""
    alpha = (closest_approach(cameras) < radius).float()
    colour = torch.tensor(rgb).expand(*alpha.shape, 3)
    return torch.cat([colour, alpha[..., None]], dim=-1)


def zero_level_radius(field: NeuSField) -> float:
    """Mean radius where the SDF first turns positive along 64 directions."""
    directions = torch.nn.functional.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    radii = torch.linspace(0.05, 0.9, 171)
    with torch.no_grad():
        sdf = field.sdf((directions[:, None, :] * radii[None, :, None]).reshape(-1, 3)).reshape(64, -1)
    return float(radii[(sdf > 0).float().argmax(dim=1)].mean())


def test_short_fit_shrinks_the_sphere_towards_the_target():
    field = tiny_field()
    cameras = Cameras.cat(
        [orbit_cameras(4, 0.0, 3.8, 20.0, 16, 16), orbit_cameras(3, 45.0, 3.8, 20.0, 16, 16, start_azimuth_deg=60.0)]
    )
    target = sphere_views(0.3, cameras, (0.8, 0.3, 0.2))
    start_radius = zero_level_radius(field)
    assert start_radius == pytest.approx(0.5, abs=0.01)
    occupancy = OccupancyGrid(resolution=16, update_every=8)
    config = FitConfig(steps=25, rays_per_step=128, num_samples=16, lr=5e-2)
    losses = fit_to_images(field, cameras, target, config, torch.Generator().manual_seed(0), occupancy)
    assert len(losses) == 25
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    end_radius = zero_level_radius(field)
    assert abs(end_radius - 0.3) < 0.5 * abs(start_radius - 0.3), end_radius


def test_benchmark_command_runs_on_cpu(capsys):
    from backend.neus import main

    args = ["--bench", "--device", "cpu", "--rays", "16", "--samples", "8", "--repeats", "1", "--levels", "2", "--log2-table-size", "10"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "with occupancy" in printed and "ms/step" in printed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_render_matches_the_cpu_render():
    """On CUDA the field runs the fused hash-grid kernel; the images must match the CPU ones."""
    import copy

    field = tiny_field(init_inv_s=100.0)
    cameras = orbit_cameras(2, 20.0, 3.8, 20.0, 12, 12)
    occupancy = OccupancyGrid(resolution=16)
    occupancy.update(field)
    with torch.no_grad():
        cpu = render_neus(field, cameras, torch.ones(3), 32, occupancy=occupancy)
    field_cuda = copy.deepcopy(field).to("cuda")
    occupancy_cuda = OccupancyGrid(resolution=16, device="cuda")
    occupancy_cuda.update(field_cuda)
    assert field_cuda.encoding.use_triton(torch.zeros(1, 3, device="cuda")) or not triton_available()
    with torch.no_grad():
        gpu = render_neus(field_cuda, cameras.to("cuda"), torch.ones(3, device="cuda"), 32, occupancy=occupancy_cuda)
    for name in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], atol=2e-4, rtol=1e-4)

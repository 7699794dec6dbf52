"""Cameras: PROTOCOL.md section 8 poses, OpenGL matrices, rays, sampling, Zero123 poses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from backend.cameras import (
    SCENE_BOUND,
    CameraRanges,
    Cameras,
    ViewPose,
    orbit_cameras,
    reference_camera,
    relative_pose,
    relative_pose_stable_zero123,
    sample_cameras,
    view_cameras,
)
from protocol.params import CameraParams, ReferenceView


def one_camera(elevation: float, azimuth: float, distance: float = 4.0, fov: float = 40.0, h: int = 8, w: int = 8) -> Cameras:
    return view_cameras([ViewPose(elevation, azimuth, distance, fov)], h, w)


def look_direction(cameras: Cameras) -> torch.Tensor:
    """World direction of the camera's -Z axis."""
    return -cameras.c2w_bx4x4[:, :3, 2]


def test_scene_bound_is_the_unit_cube_of_the_fields():
    assert SCENE_BOUND == 1.0


@pytest.mark.parametrize(
    ("elevation", "azimuth", "position", "looking"),
    [
        (0.0, 0.0, (0.0, -4.0, 0.0), (0.0, 1.0, 0.0)),  # front view: from -Y looking +Y
        (0.0, 90.0, (4.0, 0.0, 0.0), (-1.0, 0.0, 0.0)),  # from +X
        (0.0, 180.0, (0.0, 4.0, 0.0), (0.0, -1.0, 0.0)),  # from behind
        (90.0, 0.0, (0.0, 0.0, 4.0), (0.0, 0.0, -1.0)),  # from above
        (-90.0, 30.0, (0.0, 0.0, -4.0), (0.0, 0.0, 1.0)),  # from below
    ],
)
def test_named_views_sit_where_section_8_puts_them(elevation, azimuth, position, looking):
    cameras = one_camera(elevation, azimuth)
    torch.testing.assert_close(cameras.positions_bx3[0], torch.tensor(position), atol=1e-5, rtol=0)
    torch.testing.assert_close(look_direction(cameras)[0], torch.tensor(looking), atol=1e-5, rtol=0)


def test_position_formula_for_random_poses():
    generator = torch.Generator().manual_seed(3)
    elevation = torch.rand(32, generator=generator) * 170 - 85
    azimuth = torch.rand(32, generator=generator) * 360 - 180
    distance = torch.rand(32, generator=generator) * 5 + 0.5
    cameras = Cameras.from_orbit(elevation, azimuth, distance, torch.full((32,), 30.0), 4, 4)
    e, a = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    expected = torch.stack(
        [distance * torch.cos(e) * torch.sin(a), -distance * torch.cos(e) * torch.cos(a), distance * torch.sin(e)], -1
    )
    torch.testing.assert_close(cameras.positions_bx3, expected, atol=1e-5, rtol=1e-5)
    # c2w: orthonormal, right-handed, looking at the origin, image-up tilted towards +Z
    rot = cameras.c2w_bx4x4[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(32, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(32), atol=1e-5, rtol=0)
    to_origin = -cameras.positions_bx3 / distance[:, None]
    torch.testing.assert_close(look_direction(cameras), to_origin, atol=1e-5, rtol=0)
    assert bool((rot[:, 2, 1] > 0).all()), "image up must point towards world +Z"
    assert torch.allclose(rot[:, 2, 0], torch.zeros(32), atol=1e-6), "image right must be horizontal"
    torch.testing.assert_close(cameras.w2c_bx4x4() @ cameras.c2w_bx4x4, torch.eye(4).expand(32, 4, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (9, 15), (32, 20)])
def test_origin_projects_to_the_image_centre(height, width):
    cameras = orbit_cameras(5, 25.0, 3.0, 35.0, height, width)
    pixels, depth = cameras.project(torch.zeros(1, 3))
    expected = torch.tensor([width / 2, height / 2]).expand(5, 1, 2)
    torch.testing.assert_close(pixels, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(depth, torch.full((5, 1), 3.0), atol=1e-5, rtol=0)


def test_known_point_projects_where_computed_by_hand():
    # Front camera at distance 4, vertical fov 90 (focal 1), 100 rows x 200 columns (aspect 2).
    # Point (0.5, 0, 0.25): camera space x = 0.5 (right), y = 0.25 (up), depth 4.
    # NDC x = 0.5 / 4 / 2 = 0.0625, NDC y = 0.25 / 4 = 0.0625
    # column = (0.0625 + 1) / 2 * 200 = 106.25, row = (1 - 0.0625) / 2 * 100 = 46.875.
    cameras = one_camera(0.0, 0.0, distance=4.0, fov=90.0, h=100, w=200)
    pixels, depth = cameras.project(torch.tensor([[0.5, 0.0, 0.25]]))
    torch.testing.assert_close(pixels[0, 0], torch.tensor([106.25, 46.875]), atol=1e-4, rtol=0)
    torch.testing.assert_close(depth[0, 0], torch.tensor(4.0))
    clip = cameras.mvp_bx4x4(near=1.0, far=10.0) @ torch.tensor([0.5, 0.0, 0.25, 1.0])
    ndc_z = clip[0, 2] / clip[0, 3]
    expected_z = (10.0 + 1.0) / (10.0 - 1.0) - 2 * 10.0 * 1.0 / ((10.0 - 1.0) * 4.0)
    torch.testing.assert_close(ndc_z, torch.tensor(expected_z), atol=1e-5, rtol=0)


def test_projection_matrix_is_opengl():
    cameras = one_camera(10.0, 20.0, fov=60.0, h=10, w=20)
    proj = cameras.proj_bx4x4(near=0.5, far=50.0)[0]
    focal = 1.0 / math.tan(math.radians(30.0))
    expected = torch.tensor(
        [
            [focal / 2.0, 0, 0, 0],
            [0, focal, 0, 0],
            [0, 0, -(50.5) / 49.5, -2 * 50 * 0.5 / 49.5],
            [0, 0, -1, 0],
        ]
    )
    torch.testing.assert_close(proj, expected)
    with pytest.raises(ValueError, match="near"):
        cameras.proj_bx4x4(near=2.0, far=1.0)


def test_centre_pixel_ray_points_at_the_origin_and_rays_match_projection():
    cameras = orbit_cameras(3, 30.0, 3.8, 20.0, 9, 13)
    origins, dirs = cameras.rays()
    assert origins.shape == dirs.shape == (3, 9, 13, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(3, 9, 13))
    centre = dirs[:, 4, 6]
    torch.testing.assert_close(centre, -cameras.positions_bx3 / 3.8, atol=1e-5, rtol=0)
    # a point along the ray of pixel (row 1, column 10) projects to that pixel's centre
    point = origins[:, 1, 10] + 2.5 * dirs[:, 1, 10]
    for b in range(3):
        pixels, _ = cameras[b].project(point[b : b + 1])
        torch.testing.assert_close(pixels[0, 0], torch.tensor([10.5, 1.5]), atol=1e-3, rtol=0)
    # row 0 is the top of the image: its rays point higher (world Z) than the last row's
    assert bool((dirs[:, 0, 6, 2] > dirs[:, -1, 6, 2]).all())


def test_indexing_concatenation_and_device_move():
    cameras = orbit_cameras(4, 0.0, 2.0, 30.0, 6, 7)
    assert len(cameras) == 4
    assert len(cameras[2]) == 1 and float(cameras[2].azimuth_deg_b) == 180.0
    assert len(cameras[-1]) == 1 and float(cameras[-1].azimuth_deg_b) == 270.0
    joined = Cameras.cat([cameras[0:2], cameras[3]])
    assert joined.azimuth_deg_b.tolist() == [0.0, 90.0, 270.0]
    assert cameras.to("cpu").height == 6
    with pytest.raises(ValueError, match="image size"):
        Cameras.cat([cameras, cameras.with_size(8, 8)])
    with pytest.raises(ValueError, match="height"):
        orbit_cameras(2, 0.0, 2.0, 30.0, 0, 7)
    with pytest.raises(ValueError, match="distance"):
        Cameras.from_orbit(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.full((1,), 20.0), 4, 4)


def test_orbit_cameras_have_even_azimuths():
    cameras = orbit_cameras(6, 15.0, 2.5, 30.0, 4, 4, start_azimuth_deg=10.0)
    assert cameras.azimuth_deg_b.tolist() == pytest.approx([10, 70, 130, 190, 250, 310])
    assert cameras.elevation_deg_b.tolist() == pytest.approx([15.0] * 6)


def params(**overrides) -> CameraParams:
    values = dict(
        reference=ReferenceView(elevation_deg=10.0, azimuth_deg=20.0, distance=3.8, fov_deg=20.0),
        elevation_deg=(-10.0, 45.0),
        azimuth_deg=(-180.0, 180.0),
        distance=(3.0, 4.5),
        fov_deg=(15.0, 30.0),
    )
    values.update(overrides)
    return CameraParams(**values)


def test_ranges_from_params_are_widened_to_contain_the_reference():
    ranges = CameraRanges.from_params(params(elevation_deg=(20.0, 45.0), distance=(3.8, 3.8)))
    assert ranges.elevation_deg == (10.0, 45.0)
    assert ranges.distance == (3.8, 3.8)
    assert ranges.reference == ViewPose(10.0, 20.0, 3.8, 20.0)
    # any object with the same attributes works
    duck = SimpleNamespace(
        reference=SimpleNamespace(elevation_deg=0, azimuth_deg=0, distance=2, fov_deg=30),
        elevation_deg=[0, 10], azimuth_deg=[-90, 90], distance=[2, 3], fov_deg=[30, 30],
    )
    assert CameraRanges.from_params(duck).azimuth_deg == (-90.0, 90.0)
    with pytest.raises(ValueError, match=r"camera\.elevation_deg.*\(30.0, 5.0\)"):
        CameraRanges(ViewPose(10, 0, 3, 20), (30.0, 5.0), (0.0, 0.0), (3.0, 3.0), (20.0, 20.0))
    with pytest.raises(ValueError, match=r"camera\.distance"):
        CameraRanges(ViewPose(0, 0, 3, 20), (0.0, 0.0), (0.0, 0.0), (3.5, 4.0), (20.0, 20.0))


def test_sampling_at_widen_zero_is_the_reference_view():
    ranges = CameraRanges.from_params(params())
    cameras = sample_cameras(ranges, 16, 8, 8, 0.0, torch.Generator().manual_seed(0), "cpu")
    reference = reference_camera(ranges, 8, 8)
    for name in ("elevation_deg_b", "azimuth_deg_b", "distance_b", "fov_deg_b"):
        torch.testing.assert_close(getattr(cameras, name), getattr(reference, name).expand(16))
    torch.testing.assert_close(cameras.c2w_bx4x4, reference.c2w_bx4x4.expand(16, 4, 4))


def test_sampling_widens_linearly_towards_the_full_ranges():
    ranges = CameraRanges.from_params(params())
    generator = torch.Generator().manual_seed(1)
    full = sample_cameras(ranges, 4000, 2, 2, 1.0, generator, "cpu")
    half = sample_cameras(ranges, 4000, 2, 2, 0.5, generator, "cpu")
    # widen=1: the full ranges, reached close to both ends
    assert float(full.elevation_deg_b.min()) >= -10.0 and float(full.elevation_deg_b.max()) <= 45.0
    assert float(full.elevation_deg_b.min()) < -9.0 and float(full.elevation_deg_b.max()) > 44.0
    assert float(full.azimuth_deg_b.min()) < -175.0 and float(full.azimuth_deg_b.max()) > 175.0
    assert float(full.fov_deg_b.min()) >= 15.0 and float(full.fov_deg_b.max()) <= 30.0
    # widen=0.5: [ref - 0.5 (ref - min), ref + 0.5 (max - ref)] per coordinate
    expected = {"elevation_deg_b": (0.0, 27.5), "azimuth_deg_b": (-80.0, 100.0), "distance_b": (3.4, 4.15)}
    for name, (low, high) in expected.items():
        values = getattr(half, name)
        assert float(values.min()) >= low - 1e-4 and float(values.max()) <= high + 1e-4, name
        assert float(values.min()) < low + 0.05 * (high - low) and float(values.max()) > high - 0.05 * (high - low), name
    assert ranges.widened(0.5).azimuth_deg == (-80.0, 100.0)


def test_sampling_is_reproducible_from_the_seed_and_checks_its_arguments():
    ranges = CameraRanges.from_params(params())
    first = sample_cameras(ranges, 5, 4, 4, 0.7, torch.Generator().manual_seed(42), "cpu")
    second = sample_cameras(ranges, 5, 4, 4, 0.7, torch.Generator().manual_seed(42), "cpu")
    torch.testing.assert_close(first.c2w_bx4x4, second.c2w_bx4x4)
    with pytest.raises(ValueError, match=r"widen.*1\.5"):
        sample_cameras(ranges, 5, 4, 4, 1.5, None, "cpu")
    with pytest.raises(ValueError, match="batch"):
        sample_cameras(ranges, 0, 4, 4, 0.5, None, "cpu")


def test_relative_pose_matches_zero123_by_hand():
    reference = ViewPose(elevation_deg=0.0, azimuth_deg=0.0, distance=3.8, fov_deg=20.0)
    cameras = view_cameras(
        [ViewPose(30.0, 90.0, 4.0, 20.0), ViewPose(-15.0, -45.0, 3.8, 20.0), ViewPose(0.0, 0.0, 3.8, 20.0)], 4, 4
    )
    pose = relative_pose(cameras, reference)
    expected = torch.tensor(
        [
            [math.radians(-30.0), 1.0, 0.0, 0.2],  # higher up: polar shrinks
            [math.radians(15.0), -math.sqrt(0.5), math.sqrt(0.5), 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ]
    )
    torch.testing.assert_close(pose, expected, atol=1e-5, rtol=0)
    # a reference given as a camera gives the same numbers; a non-zero reference is subtracted
    torch.testing.assert_close(relative_pose(cameras, view_cameras([reference], 4, 4)), expected, atol=1e-5, rtol=0)
    shifted = relative_pose(view_cameras([ViewPose(20.0, 100.0, 3.0, 20.0)], 4, 4), ViewPose(10.0, 10.0, 3.5, 20.0))
    torch.testing.assert_close(shifted, torch.tensor([[math.radians(-10.0), 1.0, 0.0, -0.5]]), atol=1e-5, rtol=0)


def test_relative_pose_stable_zero123_carries_the_reference_polar_angle():
    reference = ViewPose(elevation_deg=20.0, azimuth_deg=0.0, distance=3.8, fov_deg=20.0)
    cameras = view_cameras([ViewPose(30.0, 90.0, 4.0, 20.0), ViewPose(20.0, 180.0, 3.0, 20.0)], 4, 4)
    pose = relative_pose_stable_zero123(cameras, reference)
    expected = torch.tensor(
        [
            [math.radians(-10.0), 1.0, 0.0, math.radians(70.0)],
            [0.0, 0.0, -1.0, math.radians(70.0)],
        ]
    )
    torch.testing.assert_close(pose, expected, atol=1e-5, rtol=0)

"""UV unwrapping with xatlas, baking a colour function into a padded texture, texture sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.meshio import load_mesh, normalize_to_unit_box
from backend.raster import get_rasterizer
from backend.texture import ColorField, ColorFieldConfig, bake_texture, pad_charts, sample_texture, unwrap

MESHES = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes"
DEVICE = torch.device("cpu")


def position_color(points_nx3: torch.Tensor) -> torch.Tensor:
    """A known colour function on the unit box: colour = position + 0.5."""
    return points_nx3 + 0.5


@pytest.fixture(scope="module")
def spot_uv():
    mesh = load_mesh(MESHES / "spot.obj")
    verts_vx3, _, _ = normalize_to_unit_box(mesh.verts_vx3)
    return verts_vx3, mesh.faces_fx3, unwrap(verts_vx3, mesh.faces_fx3, texture_size=256)


def test_unwrap_covers_every_face_with_uvs_in_unit_square(spot_uv) -> None:
    verts_vx3, faces_fx3, uv_mesh = spot_uv
    assert uv_mesh.faces_fx3.shape == faces_fx3.shape and uv_mesh.faces_fx3.dtype == np.int32
    assert uv_mesh.uvs_vx2.shape == (len(uv_mesh.verts_vx3), 2)
    assert uv_mesh.uvs_vx2.min() >= 0.0 and uv_mesh.uvs_vx2.max() <= 1.0
    # Every face keeps its corners (through the vertex mapping) and gets a non-degenerate UV triangle.
    np.testing.assert_array_equal(uv_mesh.vmapping_v[uv_mesh.faces_fx3], faces_fx3)
    np.testing.assert_array_equal(uv_mesh.verts_vx3, verts_vx3[uv_mesh.vmapping_v])
    tri_fx3x2 = uv_mesh.uvs_vx2[uv_mesh.faces_fx3]
    edge1, edge2 = tri_fx3x2[:, 1] - tri_fx3x2[:, 0], tri_fx3x2[:, 2] - tri_fx3x2[:, 0]
    uv_area_f = 0.5 * np.abs(edge1[:, 0] * edge2[:, 1] - edge1[:, 1] * edge2[:, 0])
    assert (uv_area_f > 0).all()
    # Seams were split: more vertices than the input, fewer than one per corner.
    assert len(verts_vx3) < len(uv_mesh.verts_vx3) < 3 * len(faces_fx3)


def test_baked_position_colour_reads_back_through_the_uvs(spot_uv) -> None:
    _, _, uv_mesh = spot_uv
    texture = bake_texture(uv_mesh, position_color, 256, get_rasterizer(DEVICE), DEVICE)
    assert texture.shape == (256, 256, 3) and texture.dtype == np.uint8
    uvs_vx2 = torch.from_numpy(uv_mesh.uvs_vx2)
    verts_vx3 = torch.from_numpy(uv_mesh.verts_vx3)
    faces = torch.from_numpy(uv_mesh.faces_fx3).long()
    # Face centroids: inside the charts.
    centroid_error = (sample_texture(uvs_vx2[faces].mean(1), texture) - position_color(verts_vx3[faces].mean(1))).abs()
    assert float(centroid_error.median()) < 2.0 / 255.0
    assert float(centroid_error.max()) < 0.05
    # Face corners: on chart borders, where bilinear sampling reaches past the chart into the padding.
    corner_error = (sample_texture(uvs_vx2, texture) - position_color(verts_vx3)).abs()
    assert float(corner_error.max()) < 0.06


def test_without_padding_chart_borders_bleed_background(spot_uv) -> None:
    _, _, uv_mesh = spot_uv
    unpadded = bake_texture(uv_mesh, position_color, 256, get_rasterizer(DEVICE), DEVICE, padding_px=0)
    corner_error = (sample_texture(torch.from_numpy(uv_mesh.uvs_vx2), unpadded) - position_color(torch.from_numpy(uv_mesh.verts_vx3))).abs()
    assert float(corner_error.max()) > 0.2  # what the padding in the test above prevents


def test_pad_charts_grows_texels_from_their_neighbours() -> None:
    rgb_hxwx3 = torch.zeros(9, 9, 3)
    filled_hxw = torch.zeros(9, 9, dtype=torch.bool)
    rgb_hxwx3[4, 4] = torch.tensor([1.0, 0.0, 0.0])
    rgb_hxwx3[4, 5] = torch.tensor([0.0, 1.0, 0.0])
    filled_hxw[4, 4:6] = True
    padded = pad_charts(rgb_hxwx3, filled_hxw, padding_px=1)
    torch.testing.assert_close(padded[4, 3], torch.tensor([1.0, 0.0, 0.0]))  # only the red one next to it
    torch.testing.assert_close(padded[3, 4], torch.tensor([0.5, 0.5, 0.0]))  # both are neighbours
    torch.testing.assert_close(padded[4, 6], torch.tensor([0.0, 1.0, 0.0]))
    # Beyond the padding: the mean of the filled texels.
    torch.testing.assert_close(padded[0, 0], torch.tensor([0.5, 0.5, 0.0]))
    padded_far = pad_charts(rgb_hxwx3, filled_hxw, padding_px=3)
    torch.testing.assert_close(padded_far[4, 1], torch.tensor([1.0, 0.0, 0.0]))


def test_sample_texture_orientation_and_texel_centres() -> None:
    image = np.zeros((2, 4, 3), np.uint8)
    image[0, 0] = [255, 0, 0]  # top-left texel: v near 1
    image[1, 3] = [0, 0, 255]  # bottom-right texel: u near 1, v near 0
    uvs = torch.tensor([[0.125, 0.75], [0.875, 0.25], [0.5, 0.5]])
    colors = sample_texture(uvs, image)
    torch.testing.assert_close(colors[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(colors[1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(colors[2], torch.zeros(3))


def test_color_field_fits_a_colour_function() -> None:
    torch.manual_seed(0)
    config = ColorFieldConfig(num_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32, hidden_dim=32)
    assert config.grid_config(bound=1.0).resolutions() == [4, 8, 16, 32]
    field = ColorField(config, 1.0, DEVICE)
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        points_nx3 = torch.rand(1024, 3, generator=generator) - 0.5
        loss = (field(points_nx3) - position_color(points_nx3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_nx3 = torch.rand(2048, 3, generator=generator) - 0.5
    with torch.no_grad():
        prediction = field(test_nx3)
    assert prediction.min() >= 0.0 and prediction.max() <= 1.0
    assert float((prediction - position_color(test_nx3)).abs().mean()) < 0.03

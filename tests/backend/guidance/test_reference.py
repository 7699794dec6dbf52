"""The reference image: validation, masks, recentring, depth; and the reference-view losses."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from backend.guidance.errors import GuidanceInputError
from backend.guidance.reference import (
    ReferenceImage,
    ReferenceRender,
    depth_to_normals,
    mask_image,
    prepare_reference,
    reference_losses,
)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgba_box(height=80, width=120, box=(30, 50, 10, 70)) -> np.ndarray:
    """An opaque red box (top, bottom, left, right) on a transparent background."""
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    top, bottom, left, right = box
    rgba[top:bottom, left:right] = (200, 30, 30, 255)
    return rgba


def test_alpha_mask_is_recentred_with_a_border():
    reference = prepare_reference(_png(_rgba_box()), size=64, border=0.25)
    assert reference.mask_source == "alpha" and reference.depth_hxwx1 is None
    mask = reference.mask_hxwx1[..., 0] > 0.5
    rows, cols = torch.nonzero(mask, as_tuple=True)
    # The box is 60 wide, 20 tall: its width fills half the output, centred.
    assert int(cols.max() - cols.min() + 1) == pytest.approx(32, abs=1)
    assert float(cols.float().mean()) == pytest.approx(31.5, abs=1.0)
    assert float(rows.float().mean()) == pytest.approx(31.5, abs=1.0)
    # Composited on white outside, red inside.
    assert torch.allclose(reference.rgb_hxwx3[0, 0], torch.ones(3))
    assert reference.rgb_hxwx3[32, 32].tolist() == pytest.approx([200 / 255, 30 / 255, 30 / 255], abs=0.02)


def test_not_an_image_is_refused():
    with pytest.raises(GuidanceInputError) as caught:
        prepare_reference(b"this is not a picture at all")
    assert caught.value.field == "image" and "not a PNG or JPEG" in str(caught.value)
    with pytest.raises(GuidanceInputError, match="array must be"):
        prepare_reference(np.zeros((4, 4), dtype=np.uint8))


def test_too_large_image_is_refused_before_decoding():
    huge = Image.new("L", (4097, 8))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    with pytest.raises(GuidanceInputError, match="4097×8 pixels"):
        prepare_reference(buffer.getvalue())


def test_empty_mask_is_refused():
    with pytest.raises(GuidanceInputError, match="nothing in its mask"):
        prepare_reference(_png(np.zeros((32, 32, 4), dtype=np.uint8)))


def test_plain_background_without_alpha_uses_the_border_colour():
    rgb = np.full((50, 50, 3), 255, dtype=np.uint8)
    rgb[20:30, 15:35] = (20, 120, 40)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    reference = prepare_reference(buffer.getvalue(), size=40, border=0.1)
    assert reference.mask_source == "border_colour"
    assert 0.1 < float(reference.mask_hxwx1.mean()) < 0.6


def test_matting_and_depth_estimators_are_used(tiny_models):
    rgb = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    image = np.concatenate([rgb, _rgba_box(48, 48, (8, 40, 12, 36))[..., 3:]], axis=-1)
    reference = prepare_reference(_png(image), size=32, models=tiny_models)
    depth = reference.depth_hxwx1[..., 0]
    inside = reference.mask_hxwx1[..., 0] > 0.5
    assert float(depth[inside].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(depth[inside].std()) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(depth[~inside] == 0)

    matting = tiny_models.matting
    with torch.no_grad():
        pixels = matting.processor(images=rgb, return_tensors="pt")["pixel_values"]
        logits = matting.model(pixel_values=pixels).logits
    if bool((torch.sigmoid(logits) > 0.5).any()):
        assert prepare_reference(rgb, size=32, models=tiny_models).mask_source == "matting"
    else:
        with pytest.raises(GuidanceInputError, match="mask from matting"):
            prepare_reference(rgb, size=32, models=tiny_models)


def test_a_masked_image_prepares_each_size_as_the_image_itself_does(tiny_models):
    image = _png(_rgba_box()[..., :3])  # no alpha: the matting model makes the mask
    masked = mask_image(image, models=tiny_models)
    assert masked.source == "matting" and masked.mask_hxw.shape == (80, 120)
    for size in (16, 48):
        once = prepare_reference(masked, size=size, models=tiny_models)
        again = prepare_reference(image, size=size, models=tiny_models)
        assert once.mask_source == again.mask_source == "matting"
        for name in ("rgb_hxwx3", "mask_hxwx1", "depth_hxwx1"):
            torch.testing.assert_close(getattr(once, name), getattr(again, name))


def test_depth_to_normals_of_planes():
    flat = depth_to_normals(torch.full((1, 8, 8), 3.0), fov_deg=40.0)
    assert torch.allclose(flat, torch.tensor([0.0, 0.0, 1.0]).expand(1, 8, 8, 3), atol=1e-5)
    # The plane z = −(3 + 0.5·x) (camera space): 0.5·x + z + 3 = 0, so its normal is ∝ (0.5, 0, 1).
    height = width = 16
    tan_half = math.tan(math.radians(40.0) / 2)
    xs = (torch.arange(width) + 0.5) / width * 2 - 1
    slope = 0.5
    # Solve d = 3 + slope·x_cam with x_cam = xs·tan_half·d  →  d = 3 / (1 − slope·xs·tan_half).
    depth = (3.0 / (1.0 - slope * xs * tan_half)).expand(height, width)[None]
    normals = depth_to_normals(depth, fov_deg=40.0)
    expected = torch.nn.functional.normalize(torch.tensor([slope, 0.0, 1.0]), dim=0)
    assert torch.allclose(normals[0, 4:12, 4:12], expected.expand(8, 8, 3), atol=1e-4)


def _reference_with_depth(size=16, output="disparity") -> ReferenceImage:
    """A curved estimate, standardised inside the mask and 0 outside, as prepare_reference stores it."""
    mask = torch.zeros(size, size, 1)
    mask[3:13, 4:12] = 1.0
    rows = torch.linspace(-1, 1, size).view(size, 1, 1)
    cols = torch.linspace(-1, 1, size).view(1, size, 1)
    raw = rows**2 + 0.5 * cols
    inside = mask > 0.5
    depth = torch.where(inside, (raw - raw[inside].mean()) / raw[inside].std(), torch.zeros(()))
    rgb = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(0))
    return ReferenceImage(rgb_hxwx3=rgb, mask_hxwx1=mask, depth_hxwx1=depth, mask_source="alpha", depth_output=output)


def _render_of(reference: ReferenceImage, render_depth: torch.Tensor) -> ReferenceRender:
    return ReferenceRender(
        rgb_bxhxwx3=reference.rgb_hxwx3[None].clone(),
        mask_bxhxwx1=reference.mask_hxwx1[None].clone(),
        depth_bxhxwx1=render_depth,
        normal_cam_bxhxwx3=depth_to_normals(render_depth[..., 0], 30.0),
        fov_deg=30.0,
    )


@pytest.mark.parametrize("output", ["disparity", "depth"])
def test_losses_vanish_on_a_matching_render(output):
    """A relative estimate is an affine image of the render's disparity, a metric one of its depth:
    either way a render that matches exactly has zero loss."""
    reference = _reference_with_depth(output=output)
    estimate = reference.depth_hxwx1[None]
    render_depth = 1.0 / (0.5 + 0.2 * estimate) if output == "disparity" else 3.0 + 0.4 * estimate
    losses = reference_losses(_render_of(reference, render_depth), reference)
    assert set(losses) == {"rgb", "mask", "depth", "normal"}
    for name, value in losses.items():
        assert float(value) == pytest.approx(0.0, abs=1e-4), name


def test_a_disparity_estimate_taken_for_depth_pulls_the_shape():
    """The same matching render, the estimate read in the wrong convention: the loss does not vanish."""
    reference = _reference_with_depth(output="disparity")
    render_depth = 1.0 / (0.5 + 0.2 * reference.depth_hxwx1[None])
    wrong = ReferenceImage(reference.rgb_hxwx3, reference.mask_hxwx1, -reference.depth_hxwx1, "alpha", "depth")
    losses = reference_losses(_render_of(reference, render_depth), wrong)
    assert float(losses["depth"]) > 0.01 and float(losses["normal"]) > 0.01


def test_losses_have_gradients_and_switch_off_without_depth():
    reference = _reference_with_depth()
    rgb = torch.rand(2, 16, 16, 3, requires_grad=True)
    opacity = torch.rand(2, 16, 16, 1, requires_grad=True)
    depth = (3.0 + torch.rand(2, 16, 16, 1)).requires_grad_(True)
    render = ReferenceRender(rgb, opacity, depth, None, 30.0)
    losses = reference_losses(render, reference)
    assert set(losses) == {"rgb", "mask", "depth"}
    sum(losses.values()).backward()
    assert rgb.grad.abs().sum() > 0 and opacity.grad.abs().sum() > 0 and depth.grad.abs().sum() > 0
    # Only the masked pixels drive the RGB term.
    assert torch.all(rgb.grad[:, 0, 0] == 0)
    no_depth = ReferenceImage(reference.rgb_hxwx3, reference.mask_hxwx1, None, "alpha")
    assert set(reference_losses(render, no_depth)) == {"rgb", "mask"}

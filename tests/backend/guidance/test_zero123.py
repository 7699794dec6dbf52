"""Zero123: the pose vector by hand, and the 3D-SDS gradient against the formula."""

from __future__ import annotations

import math

import pytest
import torch

from backend.guidance.zero123 import zero123_pose, zero123_sds_loss, zero123_sds_on


def test_zero123_pose_by_hand():
    pose = zero123_pose(torch.tensor([30.0, -10.0]), torch.tensor([90.0, -120.0]), torch.tensor([4.0, 3.8]),
                        reference_elevation_deg=0.0, reference_azimuth_deg=0.0, reference_distance=3.8)
    assert pose[0].tolist() == pytest.approx([-math.pi / 6, 1.0, 0.0, 0.2], abs=1e-6)
    assert pose[1].tolist() == pytest.approx([math.radians(10), -math.sqrt(3) / 2, -0.5, 0.0], abs=1e-6)
    shifted = zero123_pose(torch.tensor([-10.0]), torch.tensor([-120.0]), torch.tensor([3.8]), 15.0, 30.0, 3.8)
    assert shifted[0].tolist() == pytest.approx([math.radians(25), -0.5, -math.sqrt(3) / 2, 0.0], abs=1e-6)


def test_stable_zero123_pose_carries_the_reference_polar():
    pose = zero123_pose(torch.tensor([30.0]), torch.tensor([90.0]), torch.tensor([5.0]), 20.0, 0.0, 3.8,
                        variant="stable_zero123")
    assert pose[0].tolist() == pytest.approx([math.radians(-10), 1.0, 0.0, math.radians(70)], abs=1e-6)
    with pytest.raises(ValueError, match="variant"):
        zero123_pose(torch.zeros(1), torch.zeros(1), torch.ones(1), 0.0, 0.0, 1.0, variant="zero1234")


def _reference(z123):
    rgb = torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(40, 40, 1)
    mask[8:32, 10:30] = 1.0
    return z123.encode_reference(rgb, mask), rgb, mask


def test_reference_is_composited_on_white(tiny_models):
    z123 = tiny_models.zero123
    reference, rgb, mask = _reference(z123)
    white = z123.encode_reference(rgb * mask + (1 - mask))
    assert torch.allclose(reference.latents_1xcxhxw, white.latents_1xcxhxw, atol=1e-6)
    assert reference.image_embeds_1x1xd.shape == (1, 1, 32)
    assert reference.latents_1xcxhxw.shape == (1, 4, 16, 16)


def test_zero123_sds_gradient_equals_the_formula(tiny_models):
    z123 = tiny_models.zero123
    reference, _, _ = _reference(z123)
    pose = zero123_pose(torch.tensor([20.0, 0.0]), torch.tensor([60.0, 200.0]), torch.tensor([3.8, 4.2]), 0.0, 0.0, 3.8)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    loss, info = zero123_sds_on(z123, x0, reference, pose, (0.02, 0.98), 3.0, torch.Generator().manual_seed(11))
    loss.backward()

    with torch.no_grad():
        t, noise = info.t_b, info.noise
        x_t = tiny_models.prior2d.scheduler.add_noise(x0.detach(), noise, t)  # same DDPM schedule
        states = z123.cc_projection(torch.cat([reference.image_embeds_1x1xd.repeat(2, 1, 1), pose[:, None]], -1))
        ref_latents = reference.latents_1xcxhxw.repeat(2, 1, 1, 1)
        eps_c = z123.unet(torch.cat([x_t, ref_latents], 1), t, encoder_hidden_states=states).sample
        eps_u = z123.unet(torch.cat([x_t, torch.zeros_like(ref_latents)], 1), t,
                          encoder_hidden_states=torch.zeros_like(states)).sample
        w = (1 - z123.alphas_cumprod_t[t]).view(-1, 1, 1, 1)
        expected = w * (eps_u + 3.0 * (eps_c - eps_u) - noise) / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-3


def test_zero123_sds_on_renders(tiny_models):
    z123 = tiny_models.zero123
    reference, _, _ = _reference(z123)
    rgb = torch.rand(2, 32, 32, 3).requires_grad_(True)
    pose = torch.zeros(2, 4)
    loss, _ = zero123_sds_loss(z123, rgb, reference, pose, (0.2, 0.5), 5.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pose_bx4"):
        zero123_sds_loss(z123, rgb, reference, torch.zeros(3, 4), (0.2, 0.5), 5.0, torch.Generator())

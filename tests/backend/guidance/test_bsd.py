"""BSD with the tiny prior: LoRAs train, the texture gradient reaches the render, the UNet is restored."""

from __future__ import annotations

import pytest
import torch

from backend.cameras import Cameras
from backend.guidance.bsd import BSD, BSDConfig, angles_from_c2w
from backend.guidance.sds import encode_prompt, view_index


def _cameras(elevation_deg: list[float], azimuth_deg: list[float], distance: float = 3.8) -> Cameras:
    full = torch.ones(len(elevation_deg))
    return Cameras.from_orbit(torch.tensor(elevation_deg), torch.tensor(azimuth_deg), distance * full, 20.0 * full,
                              32, 32)


def _config(**overrides) -> BSDConfig:
    values = dict(lora_rank=4, restore_steps=2, finetune_every=2, finetune_iters=2, camera_hidden=8)
    values.update(overrides)
    return BSDConfig(**values)


def test_angles_from_c2w():
    elevation, azimuth = angles_from_c2w(_cameras([10.0, -20.0, 0.0], [0.0, 90.0, -150.0]).c2w_bx4x4)
    assert elevation.tolist() == pytest.approx([10.0, -20.0, 0.0], abs=1e-4)
    assert azimuth.tolist() == pytest.approx([0.0, 90.0, -150.0], abs=1e-4)


def _unet_out(prior, x, t, states):
    with torch.no_grad():
        return prior.unet(x, t, encoder_hidden_states=states).sample


def test_fresh_bsd_gradient_is_cfg_minus_conditional(tiny_models):
    """Fresh LoRAs are the base model: grad = w(t)·(ε_u + s(ε_c − ε_u) − ε_c), from plain UNet calls."""
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    bsd = BSD(prior, embeddings, _config(guidance_scale=6.0), torch.Generator().manual_seed(4))
    try:
        cameras = _cameras([5.0, 15.0], [170.0, 20.0])
        x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        loss, info = bsd.texture_loss_on(x0, cameras, (0.1, 0.9))
        loss.backward()
    finally:
        bsd.close()
    t, noise = info.t_b, info.noise
    x_t = prior.scheduler.add_noise(x0.detach(), noise, t)
    cond = embeddings.cond_vxlxd[torch.tensor([2, 0])]
    eps_c = _unet_out(prior, x_t, t, cond)
    eps_u = _unet_out(prior, x_t, t, embeddings.uncond_1xlxd.repeat(2, 1, 1))
    w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    expected = w * (eps_u + 6.0 * (eps_c - eps_u) - eps_c) / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert view_index(*angles_from_c2w(cameras.c2w_bx4x4)).tolist() == [2, 0]


def test_bsd_step_trains_both_loras_and_reaches_the_render(tiny_models):
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    states = embeddings.cond_vxlxd[:1]
    before = _unet_out(prior, x, t, states)

    bsd = BSD(prior, embeddings, _config(), torch.Generator().manual_seed(0))
    try:
        lora_before = {name: [p.detach().clone() for p in bsd.lora_parameters(name)] for name in (bsd.dreambooth, bsd.vsd)}
        assert all(len(params) > 0 for params in lora_before.values())
        rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        loss, parts = bsd.step(rgb, _cameras([0.0, 30.0], [0.0, 100.0]), step=0, total=10)
        loss.backward()
        assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        assert set(parts) >= {"dreambooth", "restore_t", "vsd_lora", "bsd"} and parts["restore_t"] == pytest.approx(0.5)
        for name, old in lora_before.items():
            new = bsd.lora_parameters(name)
            assert any(not torch.equal(a, b) for a, b in zip(old, new)), name
        # Outside BSD's own calls the shared UNet is the base model.
        assert torch.allclose(_unet_out(prior, x, t, states), before, atol=1e-6)
        # Step 1 is not a DreamBooth step (finetune_every=2).
        _, parts = bsd.step(rgb.detach(), _cameras([0.0, 30.0], [0.0, 100.0]), step=1, total=10)
        assert "dreambooth" not in parts
    finally:
        bsd.close()
    assert not getattr(prior.unet, "peft_config", {}) or not any(
        name.startswith("bsd_") for name in prior.unet.peft_config
    )
    assert torch.allclose(_unet_out(prior, x, t, states), before, atol=1e-6)


def test_restore_anneals_t_prime(tiny_models):
    prior = tiny_models.prior2d
    bsd = BSD(prior, encode_prompt(prior, "a cow"), _config(), torch.Generator().manual_seed(0))
    try:
        assert bsd.restore_t(0, 100) == pytest.approx(0.5)
        assert bsd.restore_t(50, 100) == pytest.approx(0.3)
        assert bsd.restore_t(500, 100) == pytest.approx(0.1)
        restored = bsd.restore(torch.rand(1, 32, 32, 3), _cameras([0.0], [0.0]), 0.3)
        assert restored.shape == (1, 32, 32, 3) and 0.0 <= float(restored.min()) and float(restored.max()) <= 1.0
    finally:
        bsd.close()

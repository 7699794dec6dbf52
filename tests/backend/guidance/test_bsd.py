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
    values = dict(lora_rank=4, restore_steps=2, bootstrap_period=5, restore_every=1, cache_size=2, camera_hidden=8)
    values.update(overrides)
    return BSDConfig(**values)


def test_angles_from_c2w():
    elevation, azimuth = angles_from_c2w(_cameras([10.0, -20.0, 0.0], [0.0, 90.0, -150.0]).c2w_bx4x4)
    assert elevation.tolist() == pytest.approx([10.0, -20.0, 0.0], abs=1e-4)
    assert azimuth.tolist() == pytest.approx([0.0, 90.0, -150.0], abs=1e-4)


def _unet_out(prior, x, t, states):
    with torch.no_grad():
        return prior.unet(x, t, encoder_hidden_states=states).sample


def test_fresh_bsd_gradient_is_cfg_minus_the_view_independent_prediction(tiny_models):
    """Fresh LoRAs are the base model: grad = w(t)·(ε_u + s(ε_view − ε_u) − ε_plain), from plain
    UNet calls (the VSD branch sees the prompt without its view suffix)."""
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
    plain = encode_prompt(prior, "a cow", view_dependent=False)
    eps_plain = _unet_out(prior, x_t, t, plain.cond_vxlxd.repeat(2, 1, 1))
    w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    expected = w * (eps_u + 6.0 * (eps_c - eps_u) - eps_plain) / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert view_index(*angles_from_c2w(cameras.c2w_bx4x4)).tolist() == [2, 0]


def _lora_copy(bsd, name):
    return [p.detach().clone() for p in bsd.lora_parameters(name)]


def _changed(bsd, name, before) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, bsd.lora_parameters(name)))


def test_bootstrap_steps_train_dreambooth_then_bsd_reaches_the_render(tiny_models):
    """Step 0 is the bootstrap phase (period 5): DreamBooth trains, no texture gradient; step 1
    distils: the render gets a gradient and the VSD LoRA trains. The shared UNet stays the base."""
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    states = embeddings.cond_vxlxd[:1]
    before = _unet_out(prior, x, t, states)

    bsd = BSD(prior, embeddings, _config(), torch.Generator().manual_seed(0))
    try:
        dreambooth, vsd = _lora_copy(bsd, bsd.dreambooth), _lora_copy(bsd, bsd.vsd)
        assert dreambooth and vsd
        rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        cams = _cameras([0.0, 30.0], [0.0, 100.0])
        loss, parts = bsd.step(rgb, cams, step=0, total=10)
        assert loss is None and parts["cached_views"] == 1 and "dreambooth" in parts
        assert parts["t_max"] == pytest.approx(0.5)
        assert _changed(bsd, bsd.dreambooth, dreambooth) and not _changed(bsd, bsd.vsd, vsd)
        # The next step is outside the phase: BSD distils.
        loss, parts = bsd.step(rgb, cams, step=1, total=10)
        loss.backward()
        assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        assert {"bsd", "grad_bsd", "vsd_lora", "t_max"} <= set(parts) and "dreambooth" not in parts
        assert _changed(bsd, bsd.vsd, vsd)
        # Outside BSD's own calls the shared UNet is the base model.
        assert torch.allclose(_unet_out(prior, x, t, states), before, atol=1e-6)
    finally:
        bsd.close()
    assert not getattr(prior.unet, "peft_config", {}) or not any(
        name.startswith("bsd_") for name in prior.unet.peft_config
    )
    assert torch.allclose(_unet_out(prior, x, t, states), before, atol=1e-6)


def test_the_bootstrap_cache_fills_every_restore_and_keeps_the_newest(tiny_models):
    """Period 10 (phases of 2 steps at 0 and 10), a restore every step, at most 3 views: the
    cache grows 1, 2, (no phase), 3, 3, and the oldest view goes first."""
    prior = tiny_models.prior2d
    bsd = BSD(prior, encode_prompt(prior, "a cow"),
              _config(bootstrap_period=10, restore_every=1, cache_size=3), torch.Generator().manual_seed(0))
    try:
        sizes = []
        for step, azimuth in ((0, 0.0), (1, 40.0), (10, 80.0), (11, 120.0)):
            rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(step))
            _, parts = bsd.step(rgb, _cameras([10.0], [azimuth]), step=step, total=20)
            sizes.append(parts["cached_views"])
        assert sizes == [1, 2, 3, 3]
        azimuths = [float(angles_from_c2w(c2w)[1]) for _, c2w in bsd.cache]
        assert azimuths == pytest.approx([40.0, 80.0, 120.0], abs=1e-3)
        assert [bsd.in_bootstrap_phase(step, 20) for step in (0, 1, 2, 9, 10, 11, 12)] == [
            True, True, False, False, True, True, False]
        # A stage shorter than the period makes the cycle the stage: 6 steps, one bootstrap step;
        # under five steps there is none.
        assert [bsd.in_bootstrap_phase(step, 6) for step in range(6)] == [True] + [False] * 5
        assert not any(bsd.in_bootstrap_phase(step, 4) for step in range(4))
    finally:
        bsd.close()


def test_dropout_draws_one_update_in_ten(tiny_models):
    prior = tiny_models.prior2d
    bsd = BSD(prior, encode_prompt(prior, "a cow"), _config(), torch.Generator().manual_seed(3))
    try:
        share = sum(bsd._dropped() for _ in range(2000)) / 2000
    finally:
        bsd.close()
    assert 0.08 < share < 0.12


def test_t_max_anneals_and_restore_returns_latents(tiny_models):
    prior = tiny_models.prior2d
    bsd = BSD(prior, encode_prompt(prior, "a cow"), _config(), torch.Generator().manual_seed(0))
    try:
        assert bsd.t_max(0, 100) == pytest.approx(0.5)
        assert bsd.t_max(50, 100) == pytest.approx(0.35)
        assert bsd.t_max(500, 100) == pytest.approx(0.2)
        x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        restored = bsd.restore(x0, _cameras([0.0], [0.0]), 0.3)
        assert restored.shape == x0.shape and torch.isfinite(restored).all()
        assert not torch.equal(restored, x0)
    finally:
        bsd.close()

"""SDS with the tiny 2D prior: the gradient against the formula computed independently."""

from __future__ import annotations

import math

import pytest
import torch

from backend.cameras import Cameras
from backend.guidance.errors import GuidanceInputError
from backend.guidance.sds import (
    PROMPT_CACHE_SIZE,
    VIEWS,
    _perp_component,
    encode_prompt,
    perp_neg_views,
    sds_loss,
    sds_loss_on,
    view_index,
)


def _cameras(elevation_deg: list[float], azimuth_deg: list[float]) -> Cameras:
    full = torch.ones(len(elevation_deg))
    return Cameras.from_orbit(torch.tensor(elevation_deg), torch.tensor(azimuth_deg), 3.8 * full, 20.0 * full, 32, 32)


def _renders(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_view_index_by_angle():
    elevation = torch.tensor([0.0, 0.0, 0.0, 0.0, 70.0, 0.0, 0.0, 10.0, 0.0])
    azimuth = torch.tensor([0.0, 90.0, 180.0, -170.0, 0.0, 45.0, -100.0, 350.0, 135.0])
    expected = ["front", "side", "back", "back", "overhead", "front", "side", "front", "back"]
    assert [VIEWS[i] for i in view_index(elevation, azimuth)] == expected


def test_sds_gradient_equals_the_formula(tiny_models):
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow", negative="blurry")
    x0 = prior.encode(_renders(2)).detach().requires_grad_(True)
    scale, seed = 7.5, 1234
    loss, info = sds_loss_on(prior, x0, embeddings, _cameras([0.0, 10.0], [0.0, 180.0]), (0.2, 0.98), scale,
                             torch.Generator().manual_seed(seed))
    loss.backward()

    # The documented draw order: t, then ε, from the caller's generator.
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(200, 981, (2,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    assert torch.equal(t, info.t_b) and torch.equal(noise, info.noise)
    # ε̂ from separate UNet calls, x_t from the diffusers scheduler, w(t) = 1 − ᾱ_t.
    with torch.no_grad():
        x_t = prior.scheduler.add_noise(x0.detach(), noise, t)
        cond = torch.stack([embeddings.cond_vxlxd[0], embeddings.cond_vxlxd[2]])
        uncond = embeddings.uncond_1xlxd.repeat(2, 1, 1)
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=uncond).sample
        eps_hat = eps_u + scale * (eps_c - eps_u)
        w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
        expected = w * (eps_hat - noise) / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-3


def test_sds_loss_gives_a_gradient_on_the_renders(tiny_models):
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    rgb = _renders(2, size=24).requires_grad_(True)  # resized to the prior's 32 px inside
    loss, info = sds_loss(prior, rgb, embeddings, _cameras([0.0, 0.0], [0.0, 0.0]), (0.02, 0.98), 100.0,
                          torch.Generator().manual_seed(0))
    loss.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert info.grad_norm > 0


def test_prompts_are_validated_and_cached(tiny_models):
    prior = tiny_models.prior2d
    with pytest.raises(GuidanceInputError) as caught:
        encode_prompt(prior, "   ")
    assert caught.value.field == "prompt"
    with pytest.raises(GuidanceInputError, match="1001 characters"):
        encode_prompt(prior, "x" * 1001)
    with pytest.raises(GuidanceInputError) as caught:
        encode_prompt(prior, "a cow", negative="y" * 2000)
    assert caught.value.field == "negative_prompt"
    with pytest.raises(GuidanceInputError, match="must be a string"):
        encode_prompt(prior, None)
    first = encode_prompt(prior, "a cow")
    assert encode_prompt(prior, "a cow") is first
    assert first.cond_vxlxd.shape[0] == len(VIEWS)
    assert not torch.allclose(first.cond_vxlxd[0], first.cond_vxlxd[2])
    assert encode_prompt(prior, "a cow", view_dependent=False).cond_vxlxd.shape[0] == 1
    for i in range(PROMPT_CACHE_SIZE + 2):  # the cache stays bounded; recently used prompts stay
        encode_prompt(prior, f"object {i}")
        assert encode_prompt(prior, "a cow") is first
    assert len(prior.prompt_cache) == PROMPT_CACHE_SIZE


def test_perp_neg_weights_and_projection(tiny_models):
    embeddings = encode_prompt(tiny_models.prior2d, "a cow")
    positive, negatives, weights = perp_neg_views(torch.tensor([0.0, 45.0, 180.0]), embeddings)
    front, side, back = embeddings.cond_vxlxd[:3]
    assert torch.allclose(positive[0], front) and torch.allclose(positive[2], back)
    assert torch.allclose(positive[1], 0.5 * front + 0.5 * side)
    # r = 1 at the front: no front negative, the side negative at full weight -2·exp(0).
    assert weights[0].tolist() == pytest.approx([0.0, -2.0])
    assert weights[1].tolist() == pytest.approx([-2.0 * math.exp(-1.0), -2.0 * math.exp(-5.0)])
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert (_perp_component(x, y) * y).flatten(1).sum(1).abs().max() < 1e-4


def test_perp_neg_sds_runs(tiny_models):
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    rgb = _renders(2).requires_grad_(True)
    loss, _ = sds_loss(prior, rgb, embeddings, _cameras([0.0, 0.0], [30.0, 120.0]), (0.2, 0.9), 20.0,
                       torch.Generator().manual_seed(3), perp_neg=True)
    loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_bad_t_range_is_refused(tiny_models):
    prior = tiny_models.prior2d
    with pytest.raises(ValueError, match="t_range"):
        sds_loss(prior, _renders(1), encode_prompt(prior, "a cow"), _cameras([0.0], [0.0]), (0.9, 0.2), 7.5,
                 torch.Generator())


def test_pixel_prior_if_layout(tmp_path):
    """A DeepFloyd-IF-like folder loads as a pixel prior; SDS runs on the [−1, 1] image, ε channels only."""
    from backend.guidance.models import ModelSources, load_models
    from backend.guidance.tiny import build_tiny_if

    folder = build_tiny_if(tmp_path / "if", seed=0)
    models = load_models("default", sources=ModelSources(prior2d=str(folder), zero123=None, depth=None),
                         roles=("prior2d",))
    prior = models.prior2d
    assert prior.kind == "pixel" and prior.vae is None and prior.resolution == 32
    assert type(prior.text_encoder).__name__ == "T5EncoderModel"
    embeddings = encode_prompt(prior, "a cow")
    rgb = _renders(1).requires_grad_(True)
    x0 = prior.encode(rgb)
    assert torch.allclose(x0, rgb.permute(0, 3, 1, 2) * 2 - 1)
    leaf = x0.detach().requires_grad_(True)
    loss, info = sds_loss_on(prior, leaf, embeddings, _cameras([0.0], [0.0]), (0.2, 0.9), 10.0,
                             torch.Generator().manual_seed(0))
    loss.backward()
    with torch.no_grad():
        x_t = prior.scheduler.add_noise(leaf.detach(), info.noise, info.t_b)
        eps_c = prior.unet(x_t, info.t_b, encoder_hidden_states=embeddings.cond_vxlxd[:1]).sample[:, :3]
        eps_u = prior.unet(x_t, info.t_b, encoder_hidden_states=embeddings.uncond_1xlxd).sample[:, :3]
        w = 1 - prior.scheduler.alphas_cumprod[info.t_b]
        expected = w * (eps_u + 10.0 * (eps_c - eps_u) - info.noise)
    assert torch.allclose(leaf.grad, expected, atol=1e-5, rtol=1e-4)

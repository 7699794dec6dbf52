"""The score-distillation methods on the tiny 2D prior: each gradient against its formula computed
independently with the UNet and the diffusers scheduler, UNet evaluations counted, bad names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backend.cameras import Cameras
from backend.config import NFSD_NEGATIVE, DistillConfig
from backend.guidance.distill import Distiller, check_method
from backend.guidance.errors import GuidanceInputError
from backend.guidance.sds import encode_prompt
from protocol.params import DISTILL_METHODS

SEED = 1234
T_RANGE = (0.1, 0.9)


def _cameras(azimuth_deg: list[float]) -> Cameras:
    full = torch.ones(len(azimuth_deg))
    return Cameras.from_orbit(0.0 * full, torch.tensor(azimuth_deg), 3.8 * full, 20.0 * full, 32, 32)


def _x0(prior, batch: int = 2) -> torch.Tensor:
    rgb = torch.rand(batch, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    return prior.encode(rgb).detach().requires_grad_(True)


def _run(prior, method: str, negative: str = "", scale: float = 50.0, **settings):
    """(x₀ with its gradient, info, the views' embeddings) of one step of `method`."""
    embeddings = encode_prompt(prior, "a cow", negative=negative)
    distiller = Distiller(prior, embeddings, DistillConfig(method=method, **settings))
    x0 = _x0(prior)
    loss, info = distiller.loss_on(x0, _cameras([0.0, 180.0]), T_RANGE, scale, torch.Generator().manual_seed(SEED))
    loss.backward()
    distiller.close()
    return x0, info, embeddings


def _eps(prior, x_t, t, text_bxlxd):
    return prior.unet(x_t, t, encoder_hidden_states=text_bxlxd).sample


def _views(embeddings):
    """Front and back: the cameras of `_run`."""
    return torch.stack([embeddings.cond_vxlxd[0], embeddings.cond_vxlxd[2]])


def _draw(x0, generator):
    t = torch.randint(100, 901, (x0.shape[0],), generator=generator)
    return t, torch.randn(x0.shape, generator=generator)


def _ddim(alphas, x, eps, t_from, t_to):
    a_from, a_to = alphas[t_from].view(-1, 1, 1, 1), alphas[t_to].view(-1, 1, 1, 1)
    return a_to.sqrt() * (x - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps


def test_nfsd_gradient_equals_the_formula(tiny_models):
    prior = tiny_models.prior2d
    x0, info, embeddings = _run(prior, "nfsd", nfsd_threshold=600)
    t, noise = _draw(x0, torch.Generator().manual_seed(SEED))
    assert torch.equal(t, info.t_b) and torch.equal(noise, info.noise)
    assert (t < 600).any() and (t >= 600).any(), "the seed must exercise both branches"
    with torch.no_grad():
        x_t = prior.scheduler.add_noise(x0.detach(), noise, t)
        empty = prior.embed_texts([""], 77).repeat(2, 1, 1)
        negative = prior.embed_texts([NFSD_NEGATIVE], 77).repeat(2, 1, 1)
        eps_empty, eps_neg = _eps(prior, x_t, t, empty), _eps(prior, x_t, t, negative)
        delta_c = _eps(prior, x_t, t, _views(embeddings)) - eps_empty
        delta_d = torch.where((t >= 600).view(-1, 1, 1, 1), eps_empty - eps_neg, eps_empty)
        w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
        expected = w * (delta_d + 7.5 * delta_c) / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-3


def test_nfsd_uses_the_jobs_negative_prompt_when_given(tiny_models):
    prior = tiny_models.prior2d
    distiller = Distiller(prior, encode_prompt(prior, "a cow", negative="green"), DistillConfig(method="nfsd"))
    assert torch.allclose(distiller.negative_1xlxd, prior.embed_texts(["green"], 77))
    assert torch.allclose(distiller.empty.uncond_1xlxd, prior.embed_texts([""], 77))


@pytest.mark.parametrize("delta_t", [50, 850])
def test_ism_gradient_equals_the_formula(tiny_models, delta_t):
    prior = tiny_models.prior2d
    x0, info, embeddings = _run(prior, "ism", negative="blurry", ism_delta_t=delta_t)
    t, noise = _draw(x0, torch.Generator().manual_seed(SEED))
    assert torch.equal(t, info.t_b) and torch.equal(noise, info.noise)
    alphas = prior.scheduler.alphas_cumprod
    empty = prior.embed_texts([""], 77)
    expected = []
    with torch.no_grad():
        for i in range(2):  # one sample at a time, its own inversion schedule 0, 200, ..., s
            s = max(int(t[i]) - delta_t, 0)
            x = prior.scheduler.add_noise(x0.detach()[i:i + 1], noise[i:i + 1], torch.tensor([0]))
            marks = list(range(0, s, 200)) + [s]
            eps = _eps(prior, x, torch.tensor([0]), empty)
            for now, nxt in zip(marks[:-1], marks[1:]):
                x = _ddim(alphas, x, eps, torch.tensor([now]), torch.tensor([nxt]))
                eps = _eps(prior, x, torch.tensor([nxt]), empty)
            x_t = _ddim(alphas, x, eps, torch.tensor([s]), t[i:i + 1])
            eps_c = _eps(prior, x_t, t[i:i + 1], _views(embeddings)[i:i + 1])
            eps_u = _eps(prior, x_t, t[i:i + 1], embeddings.uncond_1xlxd)
            expected.append((1 - alphas[t[i]]) * (eps_u + 7.5 * (eps_c - eps_u) - eps) / 2)
    expected = torch.cat(expected)
    # Batched against one-by-one UNet calls through the DDIM chain: float32 round-off ~2e-5.
    assert torch.allclose(x0.grad, expected, atol=1e-4, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-3


def test_sjc_gradient_averages_the_perturbations(tiny_models):
    prior = tiny_models.prior2d
    x0, info, embeddings = _run(prior, "sjc", negative="blurry", scale=20.0, sjc_perturbations=3)
    generator = torch.Generator().manual_seed(SEED)
    draws = [_draw(x0, generator) for _ in range(3)]
    assert torch.equal(torch.cat([t for t, _ in draws]), info.t_b)
    with torch.no_grad():
        total = torch.zeros_like(x0)
        for t, noise in draws:
            x_t = prior.scheduler.add_noise(x0.detach(), noise, t)
            eps_c = _eps(prior, x_t, t, _views(embeddings))
            eps_u = _eps(prior, x_t, t, embeddings.uncond_1xlxd.repeat(2, 1, 1))
            total += eps_u + 20.0 * (eps_c - eps_u) - noise
        expected = total / 3 / 2
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)


def test_vsd_gradient_is_pretrained_minus_lora_and_the_lora_learns(tiny_models):
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow", negative="blurry")
    distiller = Distiller(prior, embeddings, DistillConfig(method="vsd", vsd_lr=1e-2))
    cameras = _cameras([0.0, 180.0])
    try:
        x0 = _x0(prior)
        loss, info = distiller.loss_on(x0, cameras, T_RANGE, 50.0, torch.Generator().manual_seed(SEED))
        loss.backward()
        t, noise = _draw(x0, torch.Generator().manual_seed(SEED))
        assert torch.equal(t, info.t_b) and torch.equal(noise, info.noise)
        with torch.no_grad():  # a fresh LoRA (zero B, zero camera offset) is the pretrained model,
            # asked with the view-independent prompt (the VSD LoRA's, as in DreamCraft3D)
            x_t = prior.scheduler.add_noise(x0.detach(), noise, t)
            eps_c = _eps(prior, x_t, t, _views(embeddings))
            eps_u = _eps(prior, x_t, t, embeddings.uncond_1xlxd.repeat(2, 1, 1))
            eps_plain = _eps(prior, x_t, t, distiller.vsd.plain_embeddings.cond_vxlxd.expand(2, -1, -1))
            w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
            expected = w * (eps_u + 7.5 * (eps_c - eps_u) - eps_plain) / 2
        assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
        # One LoRA update later its score differs from the pretrained one, and the gradient with it.
        lora_b = [p for name, p in prior.unet.named_parameters() if f"lora_B.{distiller.vsd.vsd}." in name]
        assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0
        x0b = _x0(prior)
        loss, info = distiller.loss_on(x0b, cameras, T_RANGE, 50.0, torch.Generator().manual_seed(SEED))
        loss.backward()
        assert not torch.allclose(x0b.grad, expected, atol=1e-6)
    finally:
        distiller.close()
    assert not getattr(prior.unet, "peft_config", {}), "close() leaves the plain prior"


def test_unet_evaluations_per_step(tiny_models):
    """Measured: samples through the UNet per rendered sample and step (docs/guidance.md)."""
    prior = tiny_models.prior2d
    seen = []
    hook = prior.unet.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    counts = {}
    try:
        for method in DISTILL_METHODS:
            embeddings = encode_prompt(prior, "a cow")
            distiller = Distiller(prior, embeddings, DistillConfig(method=method, sjc_perturbations=2))
            x0 = _x0(prior, batch=1)
            seen.clear()
            # t = 850 fixed: ISM inverts 0 -> 800 in 4 steps of 200.
            loss, _ = distiller.loss_on(x0, _cameras([0.0]), (0.85, 0.85), 50.0, torch.Generator().manual_seed(0))
            counts[method] = sum(seen)
            distiller.close()
    finally:
        hook.remove()
    assert counts == {"sds": 2, "nfsd": 3, "ism": 5 + 2, "sjc": 2 * 2, "vsd": 3 + 1}


def test_unknown_method_is_refused_with_the_valid_ones(tiny_models):
    assert check_method("ism") == "ism"
    with pytest.raises(GuidanceInputError, match="unknown method 'dds'; expected one of sds, nfsd, ism, sjc, vsd") as caught:
        Distiller(tiny_models.prior2d, encode_prompt(tiny_models.prior2d, "a cow"), DistillConfig(method="dds"))
    assert caught.value.field == "distill"
    assert dataclasses.fields(DistillConfig)[0].default == "sds"

"""CUDA twins: half-precision guidance on the GPU agrees with the float32 CPU computation."""

from __future__ import annotations

import pytest
import torch

from backend.cameras import Cameras
from backend.guidance.models import load_models
from backend.guidance.sds import encode_prompt, sds_loss_on

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def cuda_models(tiny_folder):
    return load_models(str(tiny_folder), device="cuda", roles=("prior2d",))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_half_precision_sds_matches_the_cpu(cuda_models, tiny_models):
    assert cuda_models.dtype == torch.float16
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cameras = Cameras.from_orbit(torch.tensor([0.0, 20.0]), torch.tensor([10.0, 150.0]), torch.full((2,), 3.8),
                                 torch.full((2,), 20.0), 32, 32)
    gpu_x0 = x0.cuda().requires_grad_(True)
    loss, info = sds_loss_on(cuda_models.prior2d, gpu_x0, encode_prompt(cuda_models.prior2d, "a cow"),
                             cameras.to("cuda"), (0.2, 0.9), 7.5,
                             torch.Generator("cuda").manual_seed(0))
    loss.backward()
    # The CPU float32 model with the same t and ε.
    prior = tiny_models.prior2d
    embeddings = encode_prompt(prior, "a cow")
    t, noise = info.t_b.cpu(), info.noise.cpu()
    with torch.no_grad():
        x_t = prior.scheduler.add_noise(x0, noise, t)
        cond = embeddings.cond_vxlxd[torch.tensor([0, 2])]
        eps_c = prior.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = prior.unet(x_t, t, encoder_hidden_states=embeddings.uncond_1xlxd.repeat(2, 1, 1)).sample
        w = (1 - prior.scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
        expected = w * (eps_u + 7.5 * (eps_c - eps_u) - noise) / 2
    assert _relative_error(gpu_x0.grad.cpu(), expected) < 0.05


def test_half_precision_bsd_step_trains_float32_loras(cuda_models):
    from backend.guidance.bsd import BSD, BSDConfig

    prior = cuda_models.prior2d
    config = BSDConfig(lora_rank=4, restore_steps=2, bootstrap_period=1, camera_hidden=8)
    bsd = BSD(prior, encode_prompt(prior, "a cow"), config, torch.Generator("cuda").manual_seed(0))
    try:
        params = bsd.lora_parameters(bsd.vsd)
        assert all(p.dtype == torch.float32 for p in params)
        before = [p.detach().clone() for p in params]
        rgb = torch.rand(1, 32, 32, 3, device="cuda", requires_grad=True)
        cameras = Cameras.from_orbit(torch.zeros(1), torch.zeros(1), torch.full((1,), 3.8), torch.full((1,), 20.0),
                                     32, 32).to("cuda")
        loss, _ = bsd.step(rgb, cameras, step=0, total=10)
        loss.backward()
        assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, bsd.lora_parameters(bsd.vsd)))
    finally:
        bsd.close()

"""The timestep annealing and the hybrid loss L_SDS + μ·L_3D-SDS."""

from __future__ import annotations

import pytest
import torch

from backend.cameras import Cameras
from backend.guidance.schedule import HybridConfig, HybridGuidance, anneal_t_range
from backend.guidance.sds import encode_prompt, sds_loss
from backend.guidance.zero123 import zero123_pose, zero123_sds_loss


def test_anneal_t_range():
    assert anneal_t_range(0, 100) == pytest.approx((0.7, 0.85))
    assert anneal_t_range(50, 100) == pytest.approx((0.45, 0.675))
    assert anneal_t_range(100, 100) == pytest.approx((0.2, 0.5))
    assert anneal_t_range(1000, 100) == pytest.approx((0.2, 0.5))
    assert anneal_t_range(10, 40, start=(0.5, 0.5), end=(0.1, 0.1)) == pytest.approx((0.4, 0.4))
    with pytest.raises(ValueError, match="total"):
        anneal_t_range(0, 0)
    with pytest.raises(ValueError, match="step"):
        anneal_t_range(-1, 10)


def _setup(tiny_models):
    embeddings = encode_prompt(tiny_models.prior2d, "a cow")
    rgb = torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(2))
    reference = tiny_models.zero123.encode_reference(rgb, torch.ones(40, 40, 1))
    cams = Cameras.from_orbit(torch.tensor([10.0, 30.0]), torch.tensor([40.0, -150.0]), torch.tensor([3.8, 3.8]),
                              torch.tensor([20.0, 20.0]), 32, 32)
    renders = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    return embeddings, reference, cams, renders


def test_hybrid_is_sds_plus_mu_times_3d_sds(tiny_models):
    embeddings, reference, cams, renders = _setup(tiny_models)
    config = HybridConfig(mu=2.0, anneal_steps=10, guidance_scale_2d=20.0, guidance_scale_3d=4.0)
    hybrid = HybridGuidance(tiny_models, embeddings, reference, (0.0, 0.0, 3.8), config)
    loss, parts = hybrid.loss(renders, cams, step=5, generator=torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    t_range = (0.45, 0.675)
    loss_2d, info_2d = sds_loss(tiny_models.prior2d, renders, embeddings, cams, t_range, 20.0, generator)
    pose = zero123_pose(cams.elevation_deg_b, cams.azimuth_deg_b, cams.distance_b, 0.0, 0.0, 3.8)
    loss_3d, info_3d = zero123_sds_loss(tiny_models.zero123, renders, reference, pose, t_range, 4.0, generator)
    assert float(loss) == pytest.approx(float(loss_2d + 2.0 * loss_3d), rel=1e-5)
    assert parts["t_lo"] == pytest.approx(0.45) and parts["sds_3d"] == pytest.approx(float(loss_3d), rel=1e-5)
    for info in (info_2d, info_3d):
        assert ((info.t_b >= 450) & (info.t_b <= 675)).all()


def test_hybrid_without_reference_is_plain_sds(tiny_models):
    embeddings, _, cams, renders = _setup(tiny_models)
    hybrid = HybridGuidance(tiny_models, embeddings, None, (0.0, 0.0, 3.8), HybridConfig(anneal_steps=10))
    loss, parts = hybrid.loss(renders, cams, step=20, generator=torch.Generator().manual_seed(1))
    assert "sds_3d" not in parts and not hybrid.uses_zero123
    assert (parts["t_lo"], parts["t_hi"]) == pytest.approx((0.2, 0.5))
    expected, _ = sds_loss(tiny_models.prior2d, renders, embeddings, cams, (0.2, 0.5), 50.0,
                           torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)

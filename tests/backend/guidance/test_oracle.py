"""The oracle models of a known mesh: exact noise predictions, the pose composition, the depth
convention, the framing, BSD without weights, and every refused spec."""

from __future__ import annotations

import copy

from pathlib import Path

import pytest
import torch

from backend.cameras import Cameras
from backend.guidance.denoiser import Conditioning
from backend.guidance.errors import ModelLoadError
from backend.guidance.models import load_models
from backend.guidance.oracle import REFERENCE_POSE, load_oracle_models
from backend.guidance.zero123 import zero123_pose

ROOT = Path(__file__).resolve().parents[3]
MESHES = ROOT / ".." / "shared" / "meshes"


@pytest.fixture(scope="session")
def oracle(suzanne_obj):
    return load_models(f"oracle:{suzanne_obj}", "cpu")


def _cameras(elevation: list[float], azimuth: list[float], size: int = 64) -> Cameras:
    full = torch.ones(len(elevation))
    return Cameras.from_orbit(torch.tensor(elevation), torch.tensor(azimuth), 3.8 * full, 20.0 * full, size, size)


def _truth_on(oracle_model, cameras: Cameras, background: list[float], normal_look: bool = False) -> torch.Tensor:
    """[B, 3, S, S] in [−1, 1]: the object's render over a plain background."""
    views = oracle_model.object.render(cameras.with_size(oracle_model.resolution, oracle_model.resolution))
    look = (views.normal + 1.0) * 0.5 * views.mask if normal_look else views.rgb
    image = look + (1.0 - views.mask) * torch.tensor(background)
    return image.permute(0, 3, 1, 2) * 2.0 - 1.0


@pytest.mark.parametrize("normal_look", [False, True])
def test_oracle_prior_predicts_the_noise_of_a_noised_truth(oracle, normal_look):
    prior = oracle.prior2d
    cameras = _cameras([10.0, 30.0], [40.0, -120.0])
    x0 = _truth_on(prior, cameras, [0.2, 0.6, 0.9], normal_look)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t_b = torch.tensor([300, 700])
    alpha_bar = prior.alphas_cumprod_t[t_b].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
    eps = prior.predict_noise(x_t, t_b, Conditioning(cameras=cameras))
    assert float((eps - noise).pow(2).mean()) < 1e-3  # noise variance 1; only b̂ is estimated
    # Another camera's truth is not this one's: its noise is predicted badly.
    other = prior.predict_noise(x_t, t_b, Conditioning(cameras=_cameras([10.0, 30.0], [-40.0, 120.0])))
    assert float((other - noise).pow(2).mean()) > 0.05


def test_oracle_sds_pulls_a_render_to_the_truth(oracle):
    """SDS's gradient is √ᾱ√(1−ᾱ)(x₀ − x̂₀): descent on a dark image paints the (clay) object, and
    the background keeps its own colour (any plain one is data)."""
    from backend.guidance.sds import encode_prompt, sds_loss

    prior = oracle.prior2d
    cameras = _cameras([15.0], [60.0])
    embeddings = encode_prompt(prior, "a monkey head")
    rgb = torch.full((1, 64, 64, 3), 0.1, requires_grad=True)
    optimiser = torch.optim.SGD([rgb], lr=0.3)
    generator = torch.Generator().manual_seed(1)
    truth = (_truth_on(prior, cameras, [0.1, 0.1, 0.1]).permute(0, 2, 3, 1) + 1.0) / 2.0
    start = float((rgb.detach() - truth).abs().mean())
    for _ in range(30):
        loss, _ = sds_loss(prior, rgb, embeddings, cameras, (0.02, 0.5), 50.0, generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    end = float((rgb.detach() - truth).abs().mean())
    assert end < 0.2 * start


def test_oracle_zero123_composes_the_reference_pose_with_the_relative_pose(oracle):
    z123 = oracle.zero123
    cameras = _cameras([25.0, -5.0], [70.0, -150.0])
    pose = zero123_pose(cameras.elevation_deg_b, cameras.azimuth_deg_b, cameras.distance_b,
                        REFERENCE_POSE.elevation_deg, REFERENCE_POSE.azimuth_deg, REFERENCE_POSE.distance)
    composed = z123.cameras_for(Conditioning(pose_bx4=pose))
    assert torch.allclose(composed.c2w_bx4x4, cameras.c2w_bx4x4, atol=1e-4)
    # Its answer is the 2D oracle's for the same absolute camera, over white (Zero123's data) ...
    x_t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t_b = torch.tensor([400, 400])
    eps_3d = z123.predict_noise(x_t, t_b, Conditioning(pose_bx4=pose))
    prior_on_white = copy.copy(oracle.prior2d)
    prior_on_white.white_background = True
    assert torch.allclose(eps_3d, prior_on_white.predict_noise(x_t, t_b, Conditioning(cameras=cameras)), atol=1e-4)
    # ... where the 2D prior takes any plain background: its estimate differs from white here.
    assert not torch.allclose(eps_3d, oracle.prior2d.predict_noise(x_t, t_b, Conditioning(cameras=cameras)), atol=1e-2)
    # ... and a flipped azimuth sign asks for another view.
    flipped = pose * torch.tensor([1.0, -1.0, 1.0, 1.0])
    assert not torch.allclose(z123.cameras_for(Conditioning(pose_bx4=flipped)).c2w_bx4x4, cameras.c2w_bx4x4, atol=1e-2)


def test_oracle_depth_is_the_reference_views_true_depth(oracle):
    """Prepared like a Depth Anything estimate (relative inverse depth, standardised), the oracle's
    answer correlates with the true inverse view-axis depth of the reference view."""
    from backend.cameras import view_cameras
    from backend.guidance.reference import pearson, prepare_reference

    obj = oracle.prior2d.object
    reference = prepare_reference(obj.reference_rgba(128), size=128, models=oracle)
    assert reference.mask_source == "alpha" and reference.depth_hxwx1 is not None
    truth = obj.render(view_cameras([REFERENCE_POSE], 128, 128))
    inside = (reference.mask_hxwx1[..., 0] > 0.5) & (truth.mask[0, ..., 0] > 0.5)
    assert reference.depth_output == "disparity"
    disparity = 1.0 / truth.depth[0, ..., 0][inside]
    assert float(pearson(reference.depth_hxwx1[..., 0][inside], disparity)) > 0.99


def test_the_object_is_framed_as_the_prepared_reference(oracle):
    from backend.guidance.reference import prepare_reference

    rgba = oracle.prior2d.object.reference_rgba(256)
    prepared = prepare_reference(rgba, size=256).mask_hxwx1[..., 0] > 0.5
    raw = torch.as_tensor(rgba[..., 3] > 127)
    assert float((prepared & raw).sum() / (prepared | raw).sum()) > 0.95


def test_bsd_on_an_oracle_is_sds_without_loras(oracle):
    from backend.guidance.bsd import BSD, BSDConfig
    from backend.guidance.sds import encode_prompt

    prior = oracle.prior2d
    bsd = BSD(prior, encode_prompt(prior, "a monkey head"), BSDConfig(), torch.Generator().manual_seed(3))
    rgb = torch.rand(1, 64, 64, 3, requires_grad=True)
    loss, parts = bsd.step(rgb, _cameras([0.0], [0.0]), step=0, total=10)
    loss.backward()
    assert not bsd.trainable and "dreambooth" not in parts and "vsd_lora" not in parts
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    bsd.close()


def test_oracle_through_a_vae_is_exact_in_latent_space(suzanne_obj, tiny_models):
    models = load_oracle_models(f"oracle:{suzanne_obj}", torch.device("cpu"), ("prior2d",), vae=tiny_models.prior2d.vae)
    prior = models.prior2d
    assert prior.kind == "latent"
    cameras = _cameras([0.0], [30.0])
    x0 = prior.encode((_truth_on(prior, cameras, [1.0, 1.0, 1.0]).permute(0, 2, 3, 1) + 1.0) / 2.0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    t_b = torch.tensor([500])
    alpha_bar = prior.alphas_cumprod_t[t_b].view(-1, 1, 1, 1)
    eps = prior.predict_noise(alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise, t_b, Conditioning(cameras=cameras))
    # Exact up to the posterior of the look: the clay and the normal-shaded latents of a random
    # tiny VAE are close, so the other look keeps a little weight (noise variance 1).
    assert float((eps - noise).pow(2).mean()) < 1e-4


def test_every_output_names_the_oracle(oracle, suzanne_obj):
    from backend.pipeline import make_runner

    assert set(oracle.names()) == {"prior2d", "zero123", "depth", "texture"}
    assert oracle.texture is oracle.prior2d  # BSD runs on the oracle prior: no texture model
    assert all(name == f"oracle:{suzanne_obj}" for name in oracle.names().values())
    runner = make_runner(f"oracle:{suzanne_obj}", "cpu")
    assert runner.models == oracle.names() and runner.preset is None


@pytest.mark.parametrize("spec, needle", [
    ("oracle:", "expected oracle:MESH"),
    ("oracle: ,tex.png", "expected oracle:MESH"),
    ("oracle:/nowhere/cow.obj", "cow.obj: file not found"),
    (f"oracle:{MESHES / 'suzanne.obj'}", "suzanne.obj: face 0"),
    (f"oracle:{MESHES / 'suzanne.obj'},{MESHES / 'spot_texture.png'}", "suzanne.obj"),
])
def test_bad_oracle_specs_are_refused_naming_the_file(spec, needle):
    with pytest.raises(ModelLoadError) as caught:
        load_models(spec, "cpu")
    message = str(caught.value)
    assert needle in message and "\n" not in message


def test_an_empty_or_untextured_mesh_is_refused(tmp_path, suzanne_obj):
    empty = tmp_path / "empty.obj"
    empty.write_text("")
    with pytest.raises(ModelLoadError, match="empty.obj: file is empty"):
        load_models(f"oracle:{empty}", "cpu")
    with pytest.raises(ModelLoadError, match="no texture coordinates"):
        load_models(f"oracle:{suzanne_obj},{MESHES / 'spot_texture.png'}", "cpu")


@pytest.mark.parametrize("textured", [False, True])
def test_ray_cast_renders_match_the_rasteriser(textured, suzanne_obj):
    """The oracle's CPU renders (Embree) against its rasterised twin."""
    from backend.guidance.oracle import OracleObject

    mesh = MESHES / "spot.obj" if textured else suzanne_obj
    obj = OracleObject.load(mesh, MESHES / "spot_texture.png" if textured else None, torch.device("cpu"))
    cameras = _cameras([20.0, -10.0], [35.0, 200.0])
    cast, rasterised = obj.raycast(cameras), obj.rasterize(cameras)
    both = (cast.mask > 0) & (rasterised.mask > 0)
    union = (cast.mask > 0) | (rasterised.mask > 0)
    assert float(both.sum() / union.sum()) > 0.97  # silhouettes differ by edge pixels only
    inside = both[..., 0]
    assert float((cast.depth - rasterised.depth)[inside].abs().max()) < 1e-3
    assert float((cast.normal * rasterised.normal).sum(-1)[inside].mean()) > 0.999
    assert float((cast.rgb - rasterised.rgb)[inside].abs().mean()) < 0.02


def test_3d_sds_rests_on_the_truth_only_with_the_right_azimuth_sign(oracle, monkeypatch):
    """The pipeline's pose arithmetic and the oracle's agree: renders of the truth get (almost) no
    3D-SDS push; with the relative azimuth's sign flipped they get a large one."""
    from backend.guidance import schedule
    from backend.guidance.schedule import HybridConfig, HybridGuidance
    from backend.guidance.sds import encode_prompt

    cameras = _cameras([10.0, 20.0], [60.0, -110.0])
    truth = (_truth_on(oracle.zero123, cameras, [1.0, 1.0, 1.0]).permute(0, 2, 3, 1) + 1.0) / 2.0
    reference = oracle.zero123.encode_reference(torch.ones(64, 64, 3))
    hybrid = HybridGuidance(oracle, encode_prompt(oracle.prior2d, "a monkey head"), reference,
                            (REFERENCE_POSE.elevation_deg, REFERENCE_POSE.azimuth_deg, REFERENCE_POSE.distance),
                            HybridConfig(sds_weight=1.0, zero123_weight=1.0, anneal_steps=10))
    _, right = hybrid.loss(truth, cameras, step=0, generator=torch.Generator().manual_seed(5))
    true_pose = schedule.zero123_pose
    monkeypatch.setattr(schedule, "zero123_pose",
                        lambda *args, **kwargs: true_pose(*args, **kwargs) * torch.tensor([1.0, -1.0, 1.0, 1.0]))
    _, flipped = hybrid.loss(truth, cameras, step=0, generator=torch.Generator().manual_seed(5))
    assert right["sds"] == pytest.approx(flipped["sds"])  # the 2D prior sees the same renders
    assert right["sds_3d"] < 0.02 * flipped["sds_3d"]

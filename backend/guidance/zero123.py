"""Zero123 3D-SDS: score distillation with a view-conditioned prior and the reference image.

    zero123_pose(elevation_deg_b, azimuth_deg_b, distance_b, reference_elevation_deg,
                 reference_azimuth_deg, reference_distance, variant="zero123") -> [B, 4]
    z123.encode_reference(rgb_hxwx3, mask_hxwx1=None) -> Zero123Reference (or an oracle's)
    zero123_sds_loss(z123, rgb_bxhxwx3, reference, pose_bx4, t_range, guidance_scale,
                     generator) -> (loss, SDSInfo)

`z123` is any view-conditioned `backend.guidance.denoiser.Denoiser` (the diffusers Zero123 or
the oracle); it is asked for ε with the relative pose and the encoded reference in the
`Conditioning`, and with `drop_image_b` set for the unconditional branch.

Conditioning, as the released Zero123 checkpoints were trained:

    pose (Zero123)        = [Δpolar, sin Δazimuth, cos Δazimuth, Δradius]   (radians, scene units)
    pose (Stable Zero123) = [Δpolar, sin Δazimuth, cos Δazimuth, polar of the reference view]
        polar = 90° − elevation, so Δpolar = deg2rad(reference_elevation − elevation);
        Δazimuth = deg2rad(azimuth − reference_azimuth); Δradius = distance − reference_distance
    states   = cc_projection([CLIP image embedding of the reference ++ pose])   [B, 1, D]
    unet in  = [x_t ++ z_ref] on channels, z_ref = VAE posterior mode of the reference (unscaled)
    unconditional branch: states and z_ref replaced by zeros

and the SDS arithmetic of `backend.guidance.sds` (w(t) = 1 − ᾱ_t, target trick, t then ε drawn
from the generator). The reference is composited on white before encoding, as Zero123 expects.
"""

from __future__ import annotations

import torch

from backend.guidance.denoiser import Conditioning, guided_noise
from backend.guidance.models import Zero123Model
from backend.guidance.sds import SDSInfo, add_noise, sample_timesteps, target_loss

POSE_VARIANTS = ("zero123", "stable_zero123")


def zero123_pose(
    elevation_deg_b: torch.Tensor,
    azimuth_deg_b: torch.Tensor,
    distance_b: torch.Tensor,
    reference_elevation_deg: float,
    reference_azimuth_deg: float,
    reference_distance: float,
    variant: str = "zero123",
) -> torch.Tensor:
    """[B, 4] float32 relative pose of each camera to the reference camera (module docstring)."""
    if variant not in POSE_VARIANTS:
        raise ValueError(f"variant: expected one of {POSE_VARIANTS}, got {variant!r}")
    elevation = elevation_deg_b.float()
    d_polar = torch.deg2rad(reference_elevation_deg - elevation)
    d_azimuth = torch.deg2rad(azimuth_deg_b.float() - reference_azimuth_deg)
    if variant == "zero123":
        fourth = distance_b.float() - reference_distance
    else:
        fourth = torch.deg2rad(torch.full_like(elevation, 90.0 - reference_elevation_deg))
    return torch.stack([d_polar, torch.sin(d_azimuth), torch.cos(d_azimuth), fourth], dim=-1)


def zero123_sds_loss(
    z123: Zero123Model,
    rgb_bxhxwx3: torch.Tensor,
    reference: object,
    pose_bx4: torch.Tensor,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, SDSInfo]:
    """3D-SDS loss of renders [B, H, W, 3] in [0, 1] seen from `pose_bx4` relative to the reference."""
    if pose_bx4.shape != (rgb_bxhxwx3.shape[0], 4):
        raise ValueError(f"pose_bx4: expected [{rgb_bxhxwx3.shape[0]}, 4], got {tuple(pose_bx4.shape)}")
    x0 = z123.encode(rgb_bxhxwx3)
    return zero123_sds_on(z123, x0, reference, pose_bx4, t_range, guidance_scale, generator)


def zero123_sds_on(
    z123: Zero123Model,
    x0: torch.Tensor,
    reference: object,
    pose_bx4: torch.Tensor,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, SDSInfo]:
    """3D-SDS on x₀ already in Zero123's space (scaled latents [B, 4, h, w] for the real one)."""
    batch = x0.shape[0]
    # 1. Draw t, then ε; noise without gradient.
    t_b = sample_timesteps(batch, t_range, z123.num_train_timesteps, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        x_t = add_noise(x0.detach().float(), noise, z123.alphas_cumprod_t, t_b)
        # 2. Conditional and unconditional (image and pose dropped) predictions in one batch.
        keep = torch.zeros(batch, dtype=torch.bool, device=x0.device)
        cond = Conditioning(pose_bx4=pose_bx4, reference=reference, drop_image_b=keep)
        uncond = Conditioning(pose_bx4=pose_bx4, reference=reference, drop_image_b=~keep)
        eps_hat = guided_noise(z123, x_t, t_b, cond, uncond, guidance_scale)
        # 3. Weighted residual.
        w_b = (1.0 - z123.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)
        grad = torch.nan_to_num(w_b * (eps_hat - noise))
    loss = target_loss(x0, grad)
    return loss, SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))

"""Zero123 3D-SDS: score distillation with a view-conditioned prior and the reference image.

    zero123_pose(elevation_deg_b, azimuth_deg_b, distance_b, reference_elevation_deg,
                 reference_azimuth_deg, reference_distance, variant="zero123") -> [B, 4]
    encode_reference(z123, rgb_hxwx3, mask_hxwx1=None) -> Zero123Reference
    zero123_sds_loss(z123, rgb_bxhxwx3, reference, pose_bx4, t_range, guidance_scale,
                     generator) -> (loss, SDSInfo)

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.guidance.models import Zero123Model
from backend.guidance.sds import SDSInfo, add_noise, sample_timesteps, target_loss, to_bchw

POSE_VARIANTS = ("zero123", "stable_zero123")


@dataclass
class Zero123Reference:
    """The reference image encoded once per job for Zero123."""

    image_embeds_1x1xd: torch.Tensor
    """CLIP image embedding of the reference (projected), [1, 1, D] in the model dtype."""
    latents_1xcxhxw: torch.Tensor
    """VAE posterior mode of the reference, unscaled, [1, 4, h, w] in the model dtype."""


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


@torch.no_grad()
def encode_reference(
    z123: Zero123Model, rgb_hxwx3: torch.Tensor, mask_hxwx1: torch.Tensor | None = None
) -> Zero123Reference:
    """CLIP embedding and VAE latent of the reference image ([H, W, 3] in [0, 1], row 0 on top)."""
    rgb = rgb_hxwx3.to(z123.device, torch.float32)
    if mask_hxwx1 is not None:
        mask = mask_hxwx1.to(z123.device, torch.float32)
        rgb = rgb * mask + (1.0 - mask)  # white background
    image = rgb.permute(2, 0, 1)[None]
    # 1. CLIP image embedding.
    clip_in = F.interpolate(image, (z123.clip_size, z123.clip_size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(z123.clip_mean, device=z123.device).view(1, 3, 1, 1)
    std = torch.tensor(z123.clip_std, device=z123.device).view(1, 3, 1, 1)
    clip_in = ((clip_in.clamp(0.0, 1.0) - mean) / std).to(z123.dtype)
    embeds = z123.image_encoder(pixel_values=clip_in).image_embeds[:, None, :]
    # 2. VAE latent (mode, not scaled).
    vae_in = to_bchw(rgb[None], z123.resolution) * 2.0 - 1.0
    latents = z123.vae.encode(vae_in.to(z123.dtype)).latent_dist.mode()
    return Zero123Reference(image_embeds_1x1xd=embeds, latents_1xcxhxw=latents)


def zero123_states(z123: Zero123Model, reference: Zero123Reference, pose_bx4: torch.Tensor) -> torch.Tensor:
    """[B, 1, D] cross-attention states: cc_projection([image embedding ++ pose])."""
    batch = pose_bx4.shape[0]
    embeds = reference.image_embeds_1x1xd.expand(batch, -1, -1)
    pose = pose_bx4.to(z123.device, z123.dtype)[:, None, :]
    return z123.cc_projection(torch.cat([embeds, pose], dim=-1))


def zero123_sds_loss(
    z123: Zero123Model,
    rgb_bxhxwx3: torch.Tensor,
    reference: Zero123Reference,
    pose_bx4: torch.Tensor,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, SDSInfo]:
    """3D-SDS loss of renders [B, H, W, 3] in [0, 1] seen from `pose_bx4` relative to the reference."""
    if pose_bx4.shape != (rgb_bxhxwx3.shape[0], 4):
        raise ValueError(f"pose_bx4: expected [{rgb_bxhxwx3.shape[0]}, 4], got {tuple(pose_bx4.shape)}")
    image = to_bchw(rgb_bxhxwx3, z123.resolution) * 2.0 - 1.0
    x0 = z123.vae.encode(image.to(z123.dtype)).latent_dist.mean.float() * z123.latent_scale
    return zero123_sds_on(z123, x0, reference, pose_bx4, t_range, guidance_scale, generator)


def zero123_sds_on(
    z123: Zero123Model,
    x0: torch.Tensor,
    reference: Zero123Reference,
    pose_bx4: torch.Tensor,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, SDSInfo]:
    """3D-SDS on scaled latents x₀ [B, 4, h, w]."""
    batch = x0.shape[0]
    # 1. Draw t, then ε; noise without gradient.
    t_b = sample_timesteps(batch, t_range, z123.num_train_timesteps, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        x_t = add_noise(x0.detach().float(), noise, z123.alphas_cumprod_t, t_b)
        # 2. Conditional and (all-zero) unconditional inputs in one batch.
        states = zero123_states(z123, reference, pose_bx4)
        ref_latents = reference.latents_1xcxhxw.expand(batch, -1, -1, -1)
        unet_in = torch.cat([x_t.to(z123.dtype), ref_latents], dim=1)
        unet_in = torch.cat([torch.cat([x_t.to(z123.dtype), torch.zeros_like(ref_latents)], dim=1), unet_in])
        all_states = torch.cat([torch.zeros_like(states), states])
        eps_u, eps_c = z123.unet(unet_in, torch.cat([t_b, t_b]), encoder_hidden_states=all_states).sample.float().chunk(2)
        eps_hat = eps_u + guidance_scale * (eps_c - eps_u)
        # 3. Weighted residual.
        w_b = (1.0 - z123.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)
        grad = torch.nan_to_num(w_b * (eps_hat - noise))
    loss = target_loss(x0, grad)
    return loss, SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))

"""The one interface every guidance model answers through: a noise prediction.

    Conditioning(text_bxlxd=None, cameras=None, pose_bx4=None, reference=None, drop_image_b=None)
    Conditioning.cat([a, b]) -> Conditioning        two batches as one (classifier-free guidance)
    Denoiser                                        what SDS, Zero123 3D-SDS and BSD ask of a model
    guided_noise(denoiser, x_t, t_b, cond, uncond, scale) -> ε̂ = ε_u + s·(ε_c − ε_u)
    to_bchw(rgb_bxhxwx3, size) -> [B, 3, size, size]
    images_to_x0(rgb_bxhxwx3, size, vae=None, latent_scale=1.0, dtype=float32) -> x₀
    x0_to_images(x0, vae=None, latent_scale=1.0, dtype=float32) -> [B, H, W, 3]

A denoiser sees x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε in its own space (VAE latents, or the [−1, 1] image
for a pixel model), the timesteps t, and a `Conditioning` that holds everything a model might be
conditioned on: text embeddings (the 2D prior), the absolute camera of each sample (camera-aware
priors: the oracles, MVDream-style models), the camera relative to the reference view and the
encoded reference image (Zero123). A model reads the fields it needs and ignores the others.
The diffusers models (`backend.guidance.models.Prior2D`, `Zero123Model`) and the oracles
(`backend.guidance.oracle`) implement it, so a score-distillation method is a few lines:

    x_t = add_noise(x0, eps, denoiser.alphas_cumprod_t, t_b)
    eps_hat = guided_noise(denoiser, x_t, t_b, cond, uncond, scale)
    grad = (1 - alphas_cumprod_t[t_b]) * (eps_hat - eps)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from backend.cameras import Cameras


@dataclass
class Conditioning:
    """What a batch of B noisy inputs is conditioned on; fields a model does not use stay None."""

    text_bxlxd: torch.Tensor | None = None
    """Text embeddings per sample (the prompt, the negative prompt for the unconditional branch)."""
    cameras: Cameras | None = None
    """The absolute camera of each sample's view (camera-aware models)."""
    pose_bx4: torch.Tensor | None = None
    """Zero123: each view relative to the reference view (`backend.guidance.zero123.zero123_pose`)."""
    reference: Any = None
    """Zero123: the reference image as the model encoded it (`encode_reference`), one per batch."""
    drop_image_b: torch.Tensor | None = None
    """Zero123: [B] bool, True where the reference image and pose are dropped (the unconditional
    branch of classifier-free guidance)."""

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """The batches one after the other (the reference, shared, must be the same object)."""
        values: dict[str, Any] = {}
        for item in fields(Conditioning):
            column = [getattr(part, item.name) for part in parts]
            if all(value is None for value in column):
                continue
            if any(value is None for value in column):
                raise ValueError(f"Conditioning.cat: {item.name} is set in some parts and not others")
            if item.name == "reference":
                if any(value is not column[0] for value in column):
                    raise ValueError("Conditioning.cat: the parts hold different references")
                values[item.name] = column[0]
            elif item.name == "cameras":
                values[item.name] = Cameras.cat(column)
            else:
                values[item.name] = torch.cat(column)
        return Conditioning(**values)


class Denoiser(Protocol):
    """What the guidance asks of a model (the diffusers models and the oracles answer it)."""

    name: str
    """Where it came from, for `welcome` and the logs."""
    kind: str
    """"latent" (x₀ are VAE latents) or "pixel" (x₀ is the [−1, 1] image)."""
    resolution: int
    """The image size the model sees; renders are resized to it."""
    alphas_cumprod_t: torch.Tensor
    """[T] float32: ᾱ_t of its training schedule."""
    unet: Any
    """The trainable network LoRAs attach to (BSD), or None where there is none (the oracles)."""
    device: torch.device
    dtype: torch.dtype

    @property
    def num_train_timesteps(self) -> int: ...

    def encode(self, rgb_bxhxwx3: torch.Tensor) -> torch.Tensor:
        """Renders [B, H, W, 3] in [0, 1] -> x₀ in the model's space (differentiable)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x₀ -> images [B, H, W, 3] in [0, 1]."""

    def predict_noise(self, x_t: torch.Tensor, t_b: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε predicted for x_t at t (float32, the shape of x_t), whatever the model predicts."""


def guided_noise(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    t_b: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    scale: float,
) -> torch.Tensor:
    """Classifier-free guidance in one batch: ε_u + scale·(ε_c − ε_u)."""
    both = Conditioning.cat([uncond, cond])
    eps_u, eps_c = denoiser.predict_noise(torch.cat([x_t, x_t]), torch.cat([t_b, t_b]), both).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def to_bchw(rgb_bxhxwx3: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> [B, 3, size, size] in [0, 1] (bilinear)."""
    if rgb_bxhxwx3.ndim != 4 or rgb_bxhxwx3.shape[-1] != 3:
        raise ValueError(f"rgb_bxhxwx3: expected [B, H, W, 3], got {tuple(rgb_bxhxwx3.shape)}")
    image = rgb_bxhxwx3.permute(0, 3, 1, 2)
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, (size, size), mode="bilinear", align_corners=False)
    return image


def images_to_x0(
    rgb_bxhxwx3: torch.Tensor, size: int, vae: Any = None, latent_scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x₀ of renders [B, H, W, 3] in [0, 1]: scaled VAE latents (the posterior mean), or the
    [−1, 1] image at `size` without a VAE (a pixel model)."""
    image = to_bchw(rgb_bxhxwx3, size) * 2.0 - 1.0
    if vae is None:
        return image.float()
    return vae.encode(image.to(dtype)).latent_dist.mean.float() * latent_scale


def x0_to_images(x0: torch.Tensor, vae: Any = None, latent_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `images_to_x0`: [B, H, W, 3] in [0, 1]."""
    if vae is not None:
        x0 = vae.decode((x0 / latent_scale).to(dtype)).sample
    return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)

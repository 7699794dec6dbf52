"""Score distillation (SDS) with the 2D text-to-image prior.

    encode_prompt(prior, prompt, negative="", view_dependent=True) -> PromptEmbeddings
    view_index(elevation_deg_b, azimuth_deg_b) -> [B] long into VIEWS
    sds_loss(prior, rgb_bxhxwx3, embeddings, cameras, t_range, guidance_scale, generator,
             perp_neg=False) -> (loss, SDSInfo)

`prior` is any 2D `backend.guidance.denoiser.Denoiser` (a diffusers prior or an oracle); it is
asked for ε through `predict_noise` with the text embeddings and the cameras of the renders.

The maths, with x₀ the latents of the render (or the 64² image for a pixel prior such as IF):

    t ~ U{round(t_lo·T) … round(t_hi·T)},  ε ~ N(0, I),  x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε      (no gradient)
    ε̂ = ε_u + s·(ε_c − ε_u)                      classifier-free guidance, s = guidance_scale
    grad = w(t)·(ε̂ − ε),  w(t) = 1 − ᾱ_t
    target = (x₀ − grad).detach();  loss = ½·‖x₀ − target‖² / B

so `loss.backward()` puts exactly grad / B on x₀ and the UNet is never differentiated. The random
draws happen in a fixed order on the generator: first t (randint), then ε (randn).

View-dependent prompts append ", front view" / ", side view" / ", back view" / ", overhead view"
(azimuth 0 is the front; |azimuth| ≤ 45° front, ≥ 135° back, side between; elevation ≥ 60°
overhead). Perp-Neg (optional) interpolates the positive embedding between neighbouring views by
azimuth and subtracts the parts of the other views' guidance directions that are perpendicular to
the positive one, weighted by `PERP_NEG_WEIGHT`·exp(−decay·r) (as in Armandpour et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.cameras import Cameras
from backend.guidance.denoiser import Conditioning, guided_noise
from backend.guidance.errors import GuidanceInputError
from backend.guidance.models import Prior2D

VIEWS = ("front", "side", "back", "overhead")
PROMPT_CACHE_SIZE = 8
"""Prompts whose embeddings stay cached on a prior (the oldest goes first)."""
MAX_TOKENS = 77
"""Text tokens fed to the prior (CLIP's 77; DeepFloyd IF is also run at 77 T5 tokens)."""
MAX_PROMPT_CHARS = 1000
"""Longest prompt or negative prompt accepted (PROTOCOL.md section 6)."""
FRONT_HALF_WIDTH_DEG = 45.0
"""|azimuth| up to this is the front view; from 180 minus it, the back view."""
OVERHEAD_DEG = 60.0
"""Elevation from which the overhead view is used."""
PERP_NEG_WEIGHT = -2.0
"""Base weight of the negative views' perpendicular components in Perp-Neg."""
PERP_NEG_DECAY = (2.0, 10.0)
"""Decay factors of the front and side negative weights in Perp-Neg."""


@dataclass
class PromptEmbeddings:
    """Text embeddings of one prompt for every view, plus the negative (unconditional) one."""

    prompt: str
    """The prompt as given."""
    negative: str
    """The negative prompt ("" for plain classifier-free guidance)."""
    cond_vxlxd: torch.Tensor
    """[V, L, D] embeddings of "<prompt>, <view> view" for V = len(VIEWS), or [1, L, D] without views."""
    uncond_1xlxd: torch.Tensor
    """[1, L, D] embedding of the negative prompt."""

    @property
    def view_dependent(self) -> bool:
        return self.cond_vxlxd.shape[0] == len(VIEWS)

    def cond_for(self, view_b: torch.Tensor) -> torch.Tensor:
        """[B, L, D] conditional embeddings for per-sample view indices."""
        if not self.view_dependent:
            return self.cond_vxlxd.expand(view_b.shape[0], -1, -1)
        return self.cond_vxlxd[view_b.to(self.cond_vxlxd.device)]


@dataclass
class SDSInfo:
    """What one score-distillation evaluation did (for logging and for tests)."""

    t_b: torch.Tensor
    """[B] long: the timesteps drawn."""
    noise: torch.Tensor
    """[B, C, h, w]: the ε added."""
    grad: torch.Tensor
    """[B, C, h, w] float32: w(t)·(ε̂ − ε), the gradient put on x₀ (times B)."""
    grad_norm: float
    """Mean per-sample L2 norm of `grad`."""


# ----------------------------------------------------------------------------- prompts


def validate_prompt(prompt: object, field: str = "prompt", allow_empty: bool = False) -> str:
    """The prompt itself, or GuidanceInputError naming the field and what is wrong."""
    if not isinstance(prompt, str):
        raise GuidanceInputError(field, f"must be a string, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise GuidanceInputError(field, "is empty; describe the object to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise GuidanceInputError(field, f"is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    return prompt


def encode_prompt(prior: Prior2D, prompt: str, negative: str = "", view_dependent: bool = True) -> PromptEmbeddings:
    """Embeddings of the prompt per view and of the negative prompt; cached on the prior."""
    validate_prompt(prompt, "prompt")
    validate_prompt(negative, "negative_prompt", allow_empty=True)
    key = (prompt, negative, view_dependent)
    cache = prior.prompt_cache
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    texts = [f"{prompt}, {view} view" for view in VIEWS] if view_dependent else [prompt]
    embedded = prior.embed_texts(texts + [negative], MAX_TOKENS)
    cache[key] = PromptEmbeddings(prompt, negative, embedded[:-1], embedded[-1:])
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return cache[key]


def wrap_azimuth(azimuth_deg_b: torch.Tensor) -> torch.Tensor:
    """Azimuths folded into [−180, 180)."""
    return torch.remainder(azimuth_deg_b + 180.0, 360.0) - 180.0


def view_index(elevation_deg_b: torch.Tensor, azimuth_deg_b: torch.Tensor) -> torch.Tensor:
    """[B] long index into VIEWS for each camera."""
    away = wrap_azimuth(azimuth_deg_b).abs()
    index = torch.ones_like(away, dtype=torch.long)  # side
    index = torch.where(away <= FRONT_HALF_WIDTH_DEG, torch.zeros_like(index), index)
    index = torch.where(away >= 180.0 - FRONT_HALF_WIDTH_DEG, torch.full_like(index, 2), index)
    return torch.where(elevation_deg_b >= OVERHEAD_DEG, torch.full_like(index, 3), index)


# ----------------------------------------------------------------------------- shared pieces


def sample_timesteps(
    batch: int, t_range: tuple[float, float], num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """[B] long timesteps uniform in [round(t_lo·T), round(t_hi·T)] (both ends included)."""
    t_lo, t_hi = t_range
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"t_range: expected 0 <= lo <= hi <= 1, got {t_range}")
    low = max(round(t_lo * num_train_timesteps), 1)
    high = min(round(t_hi * num_train_timesteps), num_train_timesteps - 1)
    return torch.randint(low, max(high, low) + 1, (batch,), generator=generator, device=device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, per sample."""
    alpha_bar = alphas_cumprod_t[t_b].view(-1, 1, 1, 1).to(x0.dtype)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def target_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½·‖x₀ − (x₀ − grad).detach()‖² / B: its gradient on x₀ is grad / B."""
    x0 = x0.float()
    target = (x0 - grad.float()).detach()
    return 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]


# ----------------------------------------------------------------------------- SDS


def sds_loss(
    prior: Prior2D,
    rgb_bxhxwx3: torch.Tensor,
    embeddings: PromptEmbeddings,
    cameras: Cameras,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
    perp_neg: bool = False,
) -> tuple[torch.Tensor, SDSInfo]:
    """SDS loss of renders [B, H, W, 3] in [0, 1] seen from `cameras` (module docstring)."""
    x0 = prior.encode(rgb_bxhxwx3)
    return sds_loss_on(prior, x0, embeddings, cameras, t_range, guidance_scale, generator, perp_neg)


def sds_loss_on(
    prior: Prior2D,
    x0: torch.Tensor,
    embeddings: PromptEmbeddings,
    cameras: Cameras,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: torch.Generator,
    perp_neg: bool = False,
) -> tuple[torch.Tensor, SDSInfo]:
    """SDS on x₀ already in the prior's space ([B, C, h, w] latents or pixels)."""
    batch = x0.shape[0]
    # 1. Draw t, then ε; noise x₀ without gradient.
    t_b = sample_timesteps(batch, t_range, prior.num_train_timesteps, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        x_t = add_noise(x0.detach().float(), noise, prior.alphas_cumprod_t, t_b)
        # 2. Guided noise prediction.
        if perp_neg:
            eps_hat = _perp_neg_noise(prior, x_t, t_b, embeddings, cameras, guidance_scale)
        else:
            view_b = view_index(cameras.elevation_deg_b, cameras.azimuth_deg_b)
            cond = Conditioning(text_bxlxd=embeddings.cond_for(view_b), cameras=cameras)
            uncond = Conditioning(text_bxlxd=embeddings.uncond_1xlxd.expand(batch, -1, -1), cameras=cameras)
            eps_hat = guided_noise(prior, x_t, t_b, cond, uncond, guidance_scale)
        # 3. Weighted residual.
        w_b = (1.0 - prior.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)
        grad = torch.nan_to_num(w_b * (eps_hat - noise))
    loss = target_loss(x0, grad)
    return loss, SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))


def _perp_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of x perpendicular to y, per sample ([B, ...])."""
    dot = (x * y).flatten(1).sum(1)
    norm_sq = (y * y).flatten(1).sum(1).clamp_min(1e-12)
    return x - (dot / norm_sq).view(-1, 1, 1, 1) * y


def perp_neg_views(azimuth_deg_b: torch.Tensor, embeddings: PromptEmbeddings):
    """Positive embeddings [B, L, D], two negative embeddings [B, 2, L, D] and weights [B, 2].

    Front half (|a| < 90°): r = 1 − |a|/90, positive = r·front + (1 − r)·side, negatives front, side.
    Back half: r = 1 − (|a| − 90)/90, positive = r·side + (1 − r)·back, negatives side, front.
    """
    if not embeddings.view_dependent:
        raise ValueError("perp_neg: needs view-dependent prompt embeddings (encode_prompt(view_dependent=True))")
    front, side, back = (embeddings.cond_vxlxd[i] for i in range(3))
    away = wrap_azimuth(azimuth_deg_b).abs().float().to(front.device)
    positives, negatives, weights = [], [], []
    front_decay, side_decay = PERP_NEG_DECAY
    for a in away.tolist():
        if a < 90.0:
            r = 1.0 - a / 90.0
            positives.append(r * front + (1.0 - r) * side)
            negatives.append(torch.stack([front, side]))
            w_front = 0.0 if r > 0.8 else math.exp(-r * front_decay) * PERP_NEG_WEIGHT
            w_side = 0.0 if r < 0.2 else math.exp(-(1.0 - r) * side_decay) * PERP_NEG_WEIGHT
        else:
            r = 1.0 - (a - 90.0) / 90.0
            positives.append(r * side + (1.0 - r) * back)
            negatives.append(torch.stack([side, front]))
            w_front = 0.0 if r > 0.8 else math.exp(-r * side_decay) * PERP_NEG_WEIGHT / 2.0
            w_side = PERP_NEG_WEIGHT
        weights.append([w_front, w_side])
    return torch.stack(positives), torch.stack(negatives), torch.tensor(weights, device=front.device)


def _perp_neg_noise(
    prior: Prior2D,
    x_t: torch.Tensor,
    t_b: torch.Tensor,
    embeddings: PromptEmbeddings,
    cameras: Cameras,
    guidance_scale: float,
) -> torch.Tensor:
    """ε̂ = ε_u + s·(Δ_pos + Σ_k w_k·perp(Δ_k, Δ_pos)), Δ = ε(prompt) − ε_u."""
    batch = x_t.shape[0]
    positive, negatives, weights = perp_neg_views(cameras.azimuth_deg_b, embeddings)
    uncond = embeddings.uncond_1xlxd.expand(batch, -1, -1)
    states = torch.cat([uncond, positive, negatives[:, 0], negatives[:, 1]])
    cond = Conditioning(text_bxlxd=states, cameras=Cameras.cat([cameras] * 4))
    eps = prior.predict_noise(x_t.repeat(4, 1, 1, 1), t_b.repeat(4), cond)
    eps_u, eps_pos, eps_n0, eps_n1 = eps.chunk(4)
    delta_pos = eps_pos - eps_u
    accumulated = torch.zeros_like(delta_pos)
    for k, eps_neg in enumerate((eps_n0, eps_n1)):
        accumulated += weights[:, k].view(-1, 1, 1, 1) * _perp_component(eps_neg - eps_u, delta_pos)
    return eps_u + guidance_scale * (delta_pos + accumulated)

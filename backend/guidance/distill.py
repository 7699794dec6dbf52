"""The 2D prior's score-distillation methods, selectable per job: SDS, NFSD, ISM, SJC, VSD.

    check_method(name) -> name                      GuidanceInputError listing the valid methods
    Distiller(prior, embeddings, config, perp_neg=False)
        .loss(rgb_bxhxwx3, cameras, t_range, guidance_scale, generator) -> (loss, SDSInfo)
        .loss_on(x0, cameras, t_range, guidance_scale, generator)       the same on x₀
        .close()                                                         remove VSD's LoRA

Every method draws t (then ε) as SDS does, asks the prior for ε through `predict_noise`, and
puts its gradient on x₀ with the target trick of `sds.target_loss`; w(t) = 1 − ᾱ_t, s the
guidance scale, ∅ the empty prompt, y the (view-dependent) prompt, y_neg the negative prompt:

    sds   w(t)·(ε_u + s·(ε_y − ε_u) − ε)                               DreamFusion
    nfsd  w(t)·(δ_D + s·δ_C),  δ_C = ε(x_t; y) − ε(x_t; ∅),            Katzir et al. 2023
          δ_D = ε(x_t; ∅) for t < threshold, else ε(x_t; ∅) − ε(x_t; y_neg)
    ism   w(t)·(ε_u + s·(ε_y − ε_u)|x_t − ε(x_s; s, ∅)),               LucidDreamer (ISM)
          x_s: DDIM inversion of x₀ from 0 to s = t − δ_T in steps of δ_S (ε(·; ∅)),
          x_t: one DDIM inversion step from x_s to t
    sjc   mean over K perturbations k of (ε_u + s·(ε_y − ε_u) − ε_k)   Wang et al. 2023
          (each with its own t_k and ε_k: perturb-and-average scoring, weight 1)
    vsd   w(t)·(ε_u + s·(ε_y − ε_u) − ε_lora(x_t; y, c))                ProlificDreamer
          (the LoRA, `backend.guidance.bsd.BSD` without bootstrap, learns the renders' score)

Perp-Neg (`perp_neg=True`, `sds.sds_loss_on`) replaces SDS's guided score with Perp-Neg's (4 UNet
evaluations per sample); it is an SDS variant, refused with the other methods.

Draw order on the generator: SDS, NFSD, ISM, VSD draw t, then ε (VSD then draws its LoRA
update's t and ε); SJC draws t_k, ε_k for k = 1 … K. UNet evaluations per sample and step:
SDS 2, NFSD 3, ISM ⌈s/δ_S⌉ + 3, SJC 2·K, VSD 3 + 1 forward and backward of the LoRA update.
"""

from __future__ import annotations

import torch

from backend.cameras import Cameras
from backend.config import DistillConfig
from backend.guidance.denoiser import Conditioning, guided_noise
from backend.guidance.errors import GuidanceInputError
from backend.guidance.models import Prior2D
from backend.guidance.sds import (
    PromptEmbeddings,
    SDSInfo,
    add_noise,
    encode_prompt,
    sample_timesteps,
    sds_loss_on,
    target_loss,
    view_index,
)
from protocol.params import DISTILL_METHODS


def check_method(name: object) -> str:
    """`name` if it is a method, else GuidanceInputError naming the field and the valid ones."""
    if name not in DISTILL_METHODS:
        raise GuidanceInputError("distill", f"unknown method {name!r}; expected one of {', '.join(DISTILL_METHODS)}")
    return name


def ddim_step(prior: Prior2D, x: torch.Tensor, eps: torch.Tensor, t_from_b: torch.Tensor, t_to_b: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from t_from to t_to along ε: √ᾱ_to·x̂₀ + √(1 − ᾱ_to)·ε."""
    a_from = prior.alphas_cumprod_t[t_from_b].view(-1, 1, 1, 1)
    a_to = prior.alphas_cumprod_t[t_to_b].view(-1, 1, 1, 1)
    x0_hat = (x - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_hat + (1.0 - a_to).sqrt() * eps


class Distiller:
    """One stage's 2D score distillation with the configured method (module docstring)."""

    def __init__(self, prior: Prior2D, embeddings: PromptEmbeddings, config: DistillConfig,
                 perp_neg: bool = False) -> None:
        self.method = check_method(config.method)
        if perp_neg and self.method != "sds":
            raise ValueError(f"perp_neg: works with SDS only, not distill={self.method!r}")
        self.perp_neg = perp_neg
        """SDS with Perp-Neg's guided score (view-dependent `embeddings` needed)."""
        self.prior = prior
        self.embeddings = embeddings
        self.config = config
        self.empty = embeddings
        """y and ∅, the empty prompt (NFSD's unconditional term, ISM's inversion)."""
        self.negative_1xlxd = embeddings.uncond_1xlxd
        """NFSD's y_neg: the job's negative prompt, else the config's."""
        if self.method in ("nfsd", "ism"):
            self.empty = encode_prompt(prior, embeddings.prompt, "", embeddings.view_dependent)
            negative = embeddings.negative or config.nfsd_negative
            self.negative_1xlxd = encode_prompt(prior, embeddings.prompt, negative,
                                                embeddings.view_dependent).uncond_1xlxd
        self.vsd = None
        """VSD's LoRA (a `BSD` without bootstrap), made on the first step."""

    def loss(self, rgb_bxhxwx3, cameras: Cameras, t_range, guidance_scale: float, generator: torch.Generator):
        """The loss of renders [B, H, W, 3] in [0, 1] seen from `cameras`, and what it did."""
        return self.loss_on(self.prior.encode(rgb_bxhxwx3), cameras, t_range, guidance_scale, generator)

    def loss_on(self, x0, cameras: Cameras, t_range, guidance_scale: float, generator: torch.Generator):
        """The loss on x₀ in the prior's space; SDS and SJC use `guidance_scale` (the stage's),
        NFSD, ISM and VSD their papers' scales from the config."""
        if self.method == "sds":
            return sds_loss_on(self.prior, x0, self.embeddings, cameras, t_range, guidance_scale, generator,
                               perp_neg=self.perp_neg)
        if self.method == "vsd":
            return self._vsd(x0, cameras, t_range, generator)
        if self.method == "sjc":
            draws = [self._draw(x0, t_range, generator) for _ in range(self.config.sjc_perturbations)]
            t_b, noise = torch.cat([t for t, _ in draws]), torch.cat([n for _, n in draws])
        else:
            t_b, noise = self._draw(x0, t_range, generator)
        with torch.no_grad():
            method = {"nfsd": self._nfsd, "ism": self._ism, "sjc": self._sjc}[self.method]
            grad = method(x0.detach().float(), t_b, noise, cameras, guidance_scale)
            grad = torch.nan_to_num(grad)
        info = SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))
        return target_loss(x0, grad), info

    def close(self) -> None:
        """Remove VSD's LoRA from the shared UNet (nothing for the other methods)."""
        if self.vsd is not None:
            self.vsd.close()

    # ------------------------------------------------------------------ the methods

    def _draw(self, x0, t_range, generator):
        t_b = sample_timesteps(x0.shape[0], t_range, self.prior.num_train_timesteps, generator, x0.device)
        return t_b, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)

    def _conds(self, embeddings: PromptEmbeddings, cameras: Cameras) -> tuple[Conditioning, Conditioning]:
        """(y, the unconditional prompt of `embeddings`) for each view."""
        view_b = view_index(cameras.elevation_deg_b, cameras.azimuth_deg_b)
        uncond = embeddings.uncond_1xlxd.expand(view_b.shape[0], -1, -1)
        return (Conditioning(text_bxlxd=embeddings.cond_for(view_b), cameras=cameras),
                Conditioning(text_bxlxd=uncond, cameras=cameras))

    def _weight(self, t_b):
        return (1.0 - self.prior.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)

    def _nfsd(self, x0, t_b, noise, cameras, _scale):
        cond, empty = self._conds(self.empty, cameras)
        negative = Conditioning(text_bxlxd=self.negative_1xlxd.expand(x0.shape[0], -1, -1), cameras=cameras)
        x_t = add_noise(x0, noise, self.prior.alphas_cumprod_t, t_b)
        both = Conditioning.cat([empty, cond, negative])
        eps_empty, eps_y, eps_neg = self.prior.predict_noise(x_t.repeat(3, 1, 1, 1), t_b.repeat(3), both).chunk(3)
        large_b = (t_b >= self.config.nfsd_threshold).view(-1, 1, 1, 1)
        delta_d = torch.where(large_b, eps_empty - eps_neg, eps_empty)
        return self._weight(t_b) * (delta_d + self.config.nfsd_guidance_scale * (eps_y - eps_empty))

    def _ism(self, x0, t_b, noise, cameras, _scale):
        _, empty = self._conds(self.empty, cameras)
        s_b = (t_b - self.config.ism_delta_t).clamp_min(0)
        # 1. DDIM inversion with ε(·; ∅) from x₀ (noised to t = 0) up to x_s, in steps of δ_S.
        now_b = torch.zeros_like(t_b)
        x_s = add_noise(x0, noise, self.prior.alphas_cumprod_t, now_b)
        eps_s = self.prior.predict_noise(x_s, now_b, empty)
        while bool((now_b < s_b).any()):
            next_b = torch.minimum(now_b + self.config.ism_delta_s, s_b)
            x_s = ddim_step(self.prior, x_s, eps_s, now_b, next_b)
            now_b = next_b
            eps_s = self.prior.predict_noise(x_s, now_b, empty)
        # 2. One inversion step x_s -> x_t; match the guided score there against ε(x_s; s, ∅).
        x_t = ddim_step(self.prior, x_s, eps_s, s_b, t_b)
        cond, uncond = self._conds(self.embeddings, cameras)
        eps_hat = guided_noise(self.prior, x_t, t_b, cond, uncond, self.config.ism_guidance_scale)
        return self._weight(t_b) * (eps_hat - eps_s)

    def _sjc(self, x0, t_b, noise, cameras, scale):
        perturbations = self.config.sjc_perturbations
        x_t = add_noise(x0.repeat(perturbations, 1, 1, 1), noise, self.prior.alphas_cumprod_t, t_b)
        cond, uncond = self._conds(self.embeddings, Cameras.cat([cameras] * perturbations))
        eps_hat = guided_noise(self.prior, x_t, t_b, cond, uncond, scale)
        return (eps_hat - noise).view(perturbations, *x0.shape).mean(0)

    def _vsd(self, x0, cameras, t_range, generator):
        from backend.guidance.bsd import BSD, BSDConfig

        if self.vsd is None:
            config = BSDConfig(lora_rank=self.config.vsd_lora_rank, vsd_lr=self.config.vsd_lr,
                               guidance_scale=self.config.vsd_guidance_scale, bootstrap=False)
            self.vsd = BSD(self.prior, self.embeddings, config, generator)
        self.vsd.generator = generator  # this call's draws, as for the other methods
        # 1. The gradient against the LoRA's score of the renders as they were, 2. its update.
        loss, info = self.vsd.texture_loss_on(x0, cameras, t_range)
        if self.vsd.trainable:
            self.vsd.vsd_step(x0, cameras)
        return loss, info

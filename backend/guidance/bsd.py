"""Bootstrapped score distillation (BSD) for the texture stage, with two LoRAs on one UNet.

    BSDConfig                              LoRA rank and learning rates, the bootstrap schedule
    BSD(prior, embeddings, config, generator)
        .step(rgb_bxhxwx3, cameras, step, total) -> (loss | None, parts)  the readable alternation
        .bootstrap_step(x0, cameras, step, total) -> float   cache a restored render, train DreamBooth
        .restore(x0, cameras, t_prime) -> x0_restored          noise to t′, DDIM back with DreamBooth
        .vsd_step(x0, cameras) -> float                        VSD LoRA update
        .texture_loss(rgb_bxhxwx3, cameras, t_range) -> (loss, SDSInfo)
        .close()                                               remove both LoRAs

Two LoRA adapters are added to the shared, frozen 2D prior's UNet (peft, `to_q`, `to_k`, `to_v`,
`to_out.0`); no UNet is copied. Both are camera-conditioned: a small MLP per adapter maps the
flattened camera-to-world matrix (16 numbers) to the UNet's time-embedding width, and a forward
hook on `unet.time_embedding` adds it while that adapter runs. The MLP has no biases and a
zero-initialised last layer, so a fresh adapter is exactly the base model (and a zero camera,
the dropout's, is the adapter without camera).

The schedule follows DreamCraft3D's `stable_diffusion_bsd_guidance.py`: time runs in cycles of
`bootstrap_period` steps (at most the stage's). The first fifth of a cycle is the bootstrap phase: every
`restore_every` steps the current render is noised to t′ = t_max(step) and restored by the
DreamBooth model (DDIM, CFG `restore_guidance_scale`) into a cache of at most `cache_size`
renders (the oldest goes first); each step of the phase trains the "dreambooth" LoRA once on a
random cached render, with the empty prompt in place of the text 10 % of the time, and the
texture gets no BSD gradient. The rest of the cycle distils:

    "vsd"   learns the score of the current renders (ProlificDreamer's LoRA), on the
            view-independent prompt, the camera dropped 10 % of the time; no guidance.
    grad = ω(t)·(ε̂_dreambooth(x_t; y_view, c) − ε_vsd(x_t; y, c)),   ω(t) = 1 − ᾱ_t,
    ε̂_dreambooth = ε_u + s·(ε_y − ε_u)  (s = guidance_scale),  t ∈ [t_min, t_max(step)],
    t_max annealed linearly from t_max[0] to t_max[1] over the stage.

Each render is encoded once per step; the VSD LoRA trains on the detached latents after the
gradient is taken. LoRA weights train in float32; when the UNet runs in float16 their losses go
through a gradient scaler, so small gradients do not underflow in the half-precision backward.
The adapters are active only inside BSD's own calls; outside them the shared UNet is the base
model, so SDS users (and later jobs) are unaffected. `close()` deletes both adapters.

A prior without weights to adapt (`prior.unet is None`: the oracles of `backend.guidance.oracle`)
gets no LoRAs: no bootstrap phase (every step distils), and ε_vsd is the noise ε itself, so the texture gradient is
SDS on that prior, ω(t)·(ε̂ − ε) (docs/guidance.md).
"""

from __future__ import annotations

import itertools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.cameras import Cameras
from backend.guidance.denoiser import Conditioning, guided_noise
from backend.guidance.models import Prior2D
from backend.guidance.sds import PromptEmbeddings, SDSInfo, add_noise, encode_prompt, sample_timesteps, target_loss, view_index

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_adapter_ids = itertools.count()


@dataclass
class BSDConfig:
    """Settings of bootstrapped score distillation."""

    lora_rank: int = 16
    """Rank of both LoRAs."""
    dreambooth_lr: float = 1e-4
    """AdamW learning rate of the DreamBooth LoRA and its camera MLP."""
    vsd_lr: float = 1e-4
    """AdamW learning rate of the VSD LoRA and its camera MLP."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale of the DreamBooth branch of the texture gradient."""
    restore_guidance_scale: float = 7.5
    """Classifier-free guidance scale of the DreamBooth model restoring a render."""
    t_min: float = 0.05
    """Smallest timestep (fraction of T) of the texture gradient."""
    t_max: tuple[float, float] = (0.5, 0.2)
    """Largest timestep of the texture gradient, and t′ of the restoration: annealed linearly
    from the first value to the second over the stage."""
    restore_steps: int = 10
    """DDIM steps from t′ back to 0 when restoring a render."""
    bootstrap_period: int = 1000
    """Steps of one cycle; its first fifth is the bootstrap phase."""
    restore_every: int = 25
    """Steps between restored renders added to the cache during a bootstrap phase."""
    cache_size: int = 10
    """Restored renders kept (the oldest goes first)."""
    text_dropout: float = 0.1
    """Chance that a LoRA update drops its condition: the empty prompt for DreamBooth, the
    camera for VSD (so classifier-free guidance has an unconditional model to use)."""
    camera_hidden: int = 64
    """Width of the camera MLP's hidden layer."""
    bootstrap: bool = True
    """False: VSD alone (ProlificDreamer): no DreamBooth LoRA, the guided score is the base
    model's (`backend.guidance.distill` uses it for the geometry stages)."""


class CameraEmbedding(torch.nn.Module):
    """Flattened c2w [B, 16] -> time-embedding offset [B, D]; zero at start and for a zero input."""

    def __init__(self, out_dim: int, hidden: int, device: torch.device) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, hidden, bias=False),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, out_dim, bias=False),
        ).to(device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.net[2].weight)

    def forward(self, c2w_bx4x4: torch.Tensor) -> torch.Tensor:
        return self.net(c2w_bx4x4.reshape(-1, 16).float())


def angles_from_c2w(c2w_bx4x4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(elevation_deg_b, azimuth_deg_b) of cameras at (d·cos e·sin a, −d·cos e·cos a, d·sin e)."""
    position = c2w_bx4x4[:, :3, 3].float()
    distance = position.norm(dim=-1).clamp_min(1e-8)
    elevation = torch.rad2deg(torch.asin((position[:, 2] / distance).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(position[:, 0], -position[:, 1]))
    return elevation, azimuth


class BSD:
    """DreamBooth LoRA + VSD LoRA on the prior's UNet; see the module docstring."""

    def __init__(self, prior: Prior2D, embeddings: PromptEmbeddings, config: BSDConfig, generator: torch.Generator) -> None:
        from peft import LoraConfig

        self.prior = prior
        self.embeddings = embeddings
        self.plain_embeddings = encode_prompt(prior, embeddings.prompt, embeddings.negative, view_dependent=False)
        """The view-independent prompt, for the VSD LoRA."""
        self.config = config
        self.generator = generator
        self.trainable = prior.unet is not None
        """False for a prior without weights (an oracle): no LoRAs, no bootstrap phase, ε_vsd = ε."""
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Restored renders as (x0 [1, C, h, w], c2w [1, 4, 4]), oldest first."""
        unet = prior.unet
        number = next(_adapter_ids)
        self.dreambooth = f"bsd_dreambooth_{number}"
        """Adapter name of the DreamBooth LoRA."""
        self.vsd = f"bsd_vsd_{number}"
        """Adapter name of the VSD LoRA."""
        self.cameras = {}
        self.optimizers = {}
        self.scalers = {}
        if not self.trainable:
            return
        time_dim = unet.time_embedding.linear_2.out_features
        adapters = [(self.vsd, config.vsd_lr)]
        if config.bootstrap:
            adapters.insert(0, (self.dreambooth, config.dreambooth_lr))
        for name, lr in adapters:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=LORA_TARGETS)
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first
                warnings.simplefilter("ignore", UserWarning)
                unet.add_adapter(lora, adapter_name=name)
            self.cameras[name] = CameraEmbedding(time_dim, config.camera_hidden, prior.device)
            params = self.lora_parameters(name) + list(self.cameras[name].parameters())
            self.optimizers[name] = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            self.scalers[name] = torch.amp.GradScaler(prior.device.type, enabled=prior.dtype == torch.float16)
        unet.disable_adapters()

    # ------------------------------------------------------------------ adapters

    def lora_parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        """The LoRA weights of one adapter, cast to float32 for training."""
        params = []
        for name, param in self.prior.unet.named_parameters():
            if f".{adapter}." in name:
                param.data = param.data.float()
                params.append(param)
        return params

    @contextmanager
    def _adapter(self, adapter: str, c2w_bx4x4: torch.Tensor):
        """Run the UNet with one adapter and its camera offset; the base model again on exit
        (the plain prior where there is nothing to adapt or no such adapter)."""
        if not self.trainable or adapter not in self.cameras:
            yield
            return
        unet = self.prior.unet
        offset_bxd = self.cameras[adapter](c2w_bx4x4.to(self.prior.device))

        def add_camera(module, inputs, output):
            repeats = output.shape[0] // offset_bxd.shape[0]
            return output + offset_bxd.repeat(repeats, 1).to(output.dtype)

        unet.enable_adapters()
        unet.set_adapter(adapter)
        hook = unet.time_embedding.register_forward_hook(add_camera)
        try:
            yield
        finally:
            hook.remove()
            unet.disable_adapters()

    def _text(self, c2w_bx4x4: torch.Tensor) -> torch.Tensor:
        """The view-dependent prompt embeddings of cameras c2w [B, 4, 4]."""
        elevation, azimuth = angles_from_c2w(c2w_bx4x4)
        return self.embeddings.cond_for(view_index(elevation, azimuth))

    def _cond(self, cameras: Cameras) -> Conditioning:
        """The view-dependent prompt embeddings and the cameras."""
        return Conditioning(text_bxlxd=self._text(cameras.c2w_bx4x4), cameras=cameras)

    def _plain_cond(self, cameras: Cameras) -> Conditioning:
        """The view-independent prompt embeddings (the VSD LoRA's) and the cameras."""
        text = self.plain_embeddings.cond_vxlxd.expand(len(cameras), -1, -1)
        return Conditioning(text_bxlxd=text, cameras=cameras)

    def _guided_dreambooth(self, x_t, t_b, cameras: Cameras, guidance_scale: float) -> torch.Tensor:
        """ε̂ of the DreamBooth model with classifier-free guidance (no gradient)."""
        uncond = Conditioning(text_bxlxd=self.embeddings.uncond_1xlxd.expand(x_t.shape[0], -1, -1), cameras=cameras)
        with self._adapter(self.dreambooth, cameras.c2w_bx4x4):
            return guided_noise(self.prior, x_t, t_b, self._cond(cameras), uncond, guidance_scale)

    def _dropped(self) -> bool:
        """True for the `text_dropout` share of LoRA updates (drawn from the generator)."""
        draw = torch.rand((), generator=self.generator, device=self.generator.device)
        return float(draw) < self.config.text_dropout

    def _train_adapter(self, adapter: str, x0: torch.Tensor, c2w_bx4x4: torch.Tensor, cond: Conditioning) -> float:
        """One ε-prediction update of `adapter` on x₀ (t uniform in [0.02, 0.98])."""
        t_b = sample_timesteps(x0.shape[0], (0.02, 0.98), self.prior.num_train_timesteps, self.generator, x0.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        x_t = add_noise(x0, noise, self.prior.alphas_cumprod_t, t_b)
        optimizer, scaler = self.optimizers[adapter], self.scalers[adapter]
        optimizer.zero_grad(set_to_none=True)
        with self._adapter(adapter, c2w_bx4x4):
            loss = F.mse_loss(self.prior.predict_noise(x_t, t_b, cond), noise)
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    # ------------------------------------------------------------------ the pieces

    def t_max(self, step: int, total: int) -> float:
        """The annealed largest timestep (and restoring t′) at `step` of `total`."""
        start, end = self.config.t_max
        fraction = min(max(step, 0) / max(total, 1), 1.0)
        return start + (end - start) * fraction

    def in_bootstrap_phase(self, step: int, total: int) -> bool:
        """True in the first fifth of each cycle of `bootstrap_period` steps, the cycle capped
        by the stage's `total` (a stage shorter than five steps has no bootstrap phase)."""
        period = max(1, min(self.config.bootstrap_period, total))
        return step % period < period // 5

    @torch.no_grad()
    def restore(self, x0: torch.Tensor, cameras: Cameras, t_prime: float) -> torch.Tensor:
        """Latents x₀ noised to t′ and denoised by the current DreamBooth model (deterministic DDIM)."""
        alphas = self.prior.alphas_cumprod_t
        start = max(1, round(t_prime * self.prior.num_train_timesteps))
        schedule = torch.linspace(start, 0, self.config.restore_steps + 1).round().long().tolist()
        t_b = torch.full((x0.shape[0],), start, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        x_t = add_noise(x0, noise, alphas, t_b)
        x0_hat = x0
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            # 1. Predict ε and the clean sample at t.
            t_b = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            eps = self._guided_dreambooth(x_t, t_b, cameras, self.config.restore_guidance_scale)
            x0_hat = (x_t - (1.0 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
            # 2. Step to t_next along the same ε (η = 0).
            x_t = alphas[t_next].sqrt() * x0_hat + (1.0 - alphas[t_next]).sqrt() * eps
        return x0_hat

    def bootstrap_step(self, x0: torch.Tensor, cameras: Cameras, step: int, total: int) -> float:
        """One step of a bootstrap phase: restore the render into the cache when due, then one
        DreamBooth update on a random cached render (the empty prompt `text_dropout` of the time)."""
        config = self.config
        # 1. Every `restore_every` steps (and whenever the cache is empty): one more restored view.
        if step % config.restore_every == 0 or not self.cache:
            restored = self.restore(x0.detach()[:1].float(), cameras[:1], self.t_max(step, total))
            self.cache.append((restored, cameras.c2w_bx4x4[:1].detach().clone()))
            del self.cache[:-config.cache_size]
        # 2. One update on a random cached view.
        pick = int(torch.randint(len(self.cache), (1,), generator=self.generator, device=self.generator.device))
        cached_x0, cached_c2w = self.cache[pick]
        text = self.embeddings.uncond_1xlxd if self._dropped() else self._text(cached_c2w)
        return self._train_adapter(self.dreambooth, cached_x0, cached_c2w, Conditioning(text_bxlxd=text))

    def vsd_step(self, x0: torch.Tensor, cameras: Cameras) -> float:
        """One update of the VSD LoRA towards the score of the current renders' latents (the
        view-independent prompt; the camera dropped `text_dropout` of the time)."""
        c2w = torch.zeros_like(cameras.c2w_bx4x4) if self._dropped() else cameras.c2w_bx4x4
        return self._train_adapter(self.vsd, x0.detach().float(), c2w, self._plain_cond(cameras))

    def texture_loss(
        self, rgb_bxhxwx3: torch.Tensor, cameras: Cameras, t_range: tuple[float, float]
    ) -> tuple[torch.Tensor, SDSInfo]:
        """The BSD loss of renders [B, H, W, 3] in [0, 1]: gradient ω(t)(ε̂_dreambooth − ε_vsd) / B."""
        return self.texture_loss_on(self.prior.encode(rgb_bxhxwx3), cameras, t_range)

    def texture_loss_on(
        self, x0: torch.Tensor, cameras: Cameras, t_range: tuple[float, float]
    ) -> tuple[torch.Tensor, SDSInfo]:
        """texture_loss on x₀ already in the prior's space; draws t, then ε, from the generator."""
        batch = x0.shape[0]
        t_b = sample_timesteps(batch, t_range, self.prior.num_train_timesteps, self.generator, x0.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        with torch.no_grad():
            x_t = add_noise(x0.detach().float(), noise, self.prior.alphas_cumprod_t, t_b)
            eps_dreambooth = self._guided_dreambooth(x_t, t_b, cameras, self.config.guidance_scale)
            eps_vsd = noise
            if self.trainable:
                with self._adapter(self.vsd, cameras.c2w_bx4x4):
                    eps_vsd = self.prior.predict_noise(x_t, t_b, self._plain_cond(cameras))
            w_b = (1.0 - self.prior.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)
            grad = torch.nan_to_num(w_b * (eps_dreambooth - eps_vsd))
        loss = target_loss(x0, grad)
        return loss, SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))

    # ------------------------------------------------------------------ the alternation

    def step(
        self, rgb_bxhxwx3: torch.Tensor, cameras: Cameras, step: int, total: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """One texture step: in a bootstrap phase, a DreamBooth update (loss None: the texture
        gets no BSD gradient); otherwise the texture gradient, then a VSD LoRA update. A prior
        without weights (an oracle) has no bootstrap phase and no VSD LoRA."""
        bootstrap = self.trainable and self.config.bootstrap and self.in_bootstrap_phase(step, total)
        with torch.set_grad_enabled(not bootstrap and torch.is_grad_enabled()):
            x0 = self.prior.encode(rgb_bxhxwx3)  # once per step
        t_max = self.t_max(step, total)
        parts: dict[str, float] = {"t_max": t_max}
        if bootstrap:
            parts["dreambooth"] = self.bootstrap_step(x0, cameras, step, total)
            parts["cached_views"] = float(len(self.cache))
            return None, parts
        # 1. The texture gradient from the difference of the two scores.
        loss, info = self.texture_loss_on(x0, cameras, (min(self.config.t_min, t_max), t_max))
        parts["bsd"] = float(loss.detach())
        parts["grad_bsd"] = info.grad_norm
        if not math.isfinite(parts["bsd"]):
            raise FloatingPointError(f"BSD loss is {parts['bsd']} at step {step}")
        # 2. The VSD LoRA follows the renders as they are now.
        if self.trainable:
            parts["vsd_lora"] = self.vsd_step(x0, cameras)
        return loss, parts

    def close(self) -> None:
        """Remove both LoRAs from the shared UNet (it is the plain prior again)."""
        unet = self.prior.unet
        names = [name for name in (self.dreambooth, self.vsd) if name in getattr(unet, "peft_config", {})]
        if names:
            with warnings.catch_warnings():  # peft warns when the active adapter goes
                warnings.simplefilter("ignore", UserWarning)
                unet.delete_adapters(names)
        self.optimizers.clear()

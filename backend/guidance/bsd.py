"""Bootstrapped score distillation (BSD) for the texture stage, with two LoRAs on one UNet.

    BSDConfig                              LoRA rank and learning rates, schedule of the bootstrap
    BSD(prior, embeddings, config, generator)
        .step(rgb_bxhxwx3, cameras, step, total) -> (loss, parts)    the readable alternation
        .finetune_step(renders_bxhxwx3, cameras, step, total) -> float  DreamBooth LoRA round
        .vsd_step(renders_bxhxwx3, cameras) -> float                  VSD LoRA update
        .vsd_step_on(x0, cameras) -> float                            the same on x₀
        .texture_loss(rgb_bxhxwx3, cameras, t_range) -> (loss, SDSInfo)
        .close()                                                       remove both LoRAs

Two LoRA adapters are added to the shared, frozen 2D prior's UNet (peft, `to_q`, `to_k`, `to_v`,
`to_out.0`); no UNet is copied. Both are camera-conditioned: a small MLP per adapter maps the
flattened camera-to-world matrix (16 numbers) to the UNet's time-embedding width, and a forward
hook on `unet.time_embedding` adds it while that adapter runs. The MLP has no biases and a
zero-initialised last layer, so a fresh adapter is exactly the base model.

    "dreambooth"  fine-tuned on augmented renders: each render is noised to t′ and restored by the
                  current DreamBooth model (DDIM from t′ to 0), t′ annealed from 0.5 to 0.1 over
                  the stage; trained with the plain ε-prediction loss, view-dependent prompt.
    "vsd"         learns the score of the current renders (ProlificDreamer's LoRA): ε-loss on the
                  renders themselves, no classifier-free guidance.

Texture gradient, on x₀ = latents of the render (target trick as in SDS):

    grad = ω(t)·(ε̂_dreambooth(x_t; y, c) − ε_vsd(x_t; y, c)),   ω(t) = 1 − ᾱ_t
    ε̂_dreambooth = ε_u + s·(ε_y − ε_u)  (classifier-free guidance, s = guidance_scale)

The adapters are active only inside BSD's own calls; outside them the shared UNet is the base
model, so SDS users (and later jobs) are unaffected. `close()` deletes both adapters.

A prior without weights to adapt (`prior.unet is None`: the oracles of `backend.guidance.oracle`)
gets no LoRAs: no DreamBooth rounds, and ε_vsd is the noise ε itself, so the texture gradient is
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
from backend.guidance.sds import PromptEmbeddings, SDSInfo, add_noise, sample_timesteps, target_loss, view_index

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_adapter_ids = itertools.count()


@dataclass
class BSDConfig:
    """Settings of bootstrapped score distillation."""

    lora_rank: int = 16
    """Rank of both LoRAs."""
    dreambooth_lr: float = 1e-4
    """AdamW learning rate of the DreamBooth LoRA and its camera MLP."""
    vsd_lr: float = 1e-3
    """AdamW learning rate of the VSD LoRA and its camera MLP."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale of the DreamBooth branch of the texture gradient."""
    t_range: tuple[float, float] = (0.02, 0.5)
    """Timestep range (fractions of T) of the texture gradient."""
    restore_t_start: float = 0.5
    """t′ of the augmentation at the start of the stage."""
    restore_t_end: float = 0.1
    """t′ at the end of the stage (annealed linearly)."""
    restore_steps: int = 10
    """DDIM steps from t′ back to 0 when restoring a render."""
    finetune_every: int = 100
    """Steps between DreamBooth rounds (a round runs at step 0, finetune_every, ...)."""
    finetune_iters: int = 20
    """LoRA updates per DreamBooth round, on one set of restored renders."""
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
        self.config = config
        self.generator = generator
        self.trainable = prior.unet is not None
        """False for a prior without weights (an oracle): no LoRAs, ε_vsd = ε."""
        unet = prior.unet
        number = next(_adapter_ids)
        self.dreambooth = f"bsd_dreambooth_{number}"
        """Adapter name of the DreamBooth LoRA."""
        self.vsd = f"bsd_vsd_{number}"
        """Adapter name of the VSD LoRA."""
        self.cameras = {}
        self.optimizers = {}
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
    def _adapter(self, adapter: str, cameras: Cameras):
        """Run the UNet with one adapter and its camera offset; the base model again on exit
        (the plain prior where there is nothing to adapt or no such adapter)."""
        if not self.trainable or adapter not in self.cameras:
            yield
            return
        unet = self.prior.unet
        offset_bxd = self.cameras[adapter](cameras.c2w_bx4x4.to(self.prior.device))

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

    def _cond(self, cameras: Cameras) -> Conditioning:
        """The view-dependent prompt embeddings and the cameras."""
        elevation, azimuth = angles_from_c2w(cameras.c2w_bx4x4)
        return Conditioning(text_bxlxd=self.embeddings.cond_for(view_index(elevation, azimuth)), cameras=cameras)

    def _guided_dreambooth(self, x_t, t_b, cameras: Cameras) -> torch.Tensor:
        """ε̂ of the DreamBooth model with classifier-free guidance (no gradient)."""
        uncond = Conditioning(text_bxlxd=self.embeddings.uncond_1xlxd.expand(x_t.shape[0], -1, -1), cameras=cameras)
        with self._adapter(self.dreambooth, cameras):
            return guided_noise(self.prior, x_t, t_b, self._cond(cameras), uncond, self.config.guidance_scale)

    def _train_adapter(self, adapter: str, x0: torch.Tensor, cameras: Cameras) -> float:
        """One ε-prediction update of `adapter` on x₀ (t uniform in [0.02, 0.98])."""
        t_b = sample_timesteps(x0.shape[0], (0.02, 0.98), self.prior.num_train_timesteps, self.generator, x0.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        x_t = add_noise(x0, noise, self.prior.alphas_cumprod_t, t_b)
        optimizer = self.optimizers[adapter]
        optimizer.zero_grad(set_to_none=True)
        with self._adapter(adapter, cameras):
            loss = F.mse_loss(self.prior.predict_noise(x_t, t_b, self._cond(cameras)), noise)
            loss.backward()
        optimizer.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ the pieces

    def restore_t(self, step: int, total: int) -> float:
        """t′ of the augmentation: annealed from restore_t_start to restore_t_end over `total`."""
        fraction = min(max(step, 0) / max(total, 1), 1.0)
        return self.config.restore_t_start + (self.config.restore_t_end - self.config.restore_t_start) * fraction

    @torch.no_grad()
    def restore(self, renders_bxhxwx3: torch.Tensor, cameras: Cameras, t_prime: float) -> torch.Tensor:
        """Renders noised to t′ and denoised by the current DreamBooth model (deterministic DDIM)."""
        alphas = self.prior.alphas_cumprod_t
        x0 = self.prior.encode(renders_bxhxwx3)
        start = max(1, round(t_prime * self.prior.num_train_timesteps))
        schedule = torch.linspace(start, 0, self.config.restore_steps + 1).round().long().tolist()
        t_b = torch.full((x0.shape[0],), start, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        x_t = add_noise(x0, noise, alphas, t_b)
        x0_hat = x0
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            # 1. Predict ε and the clean sample at t.
            t_b = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            eps = self._guided_dreambooth(x_t, t_b, cameras)
            x0_hat = (x_t - (1.0 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
            # 2. Step to t_next along the same ε (η = 0).
            x_t = alphas[t_next].sqrt() * x0_hat + (1.0 - alphas[t_next]).sqrt() * eps
        return self.prior.decode(x0_hat)

    def finetune_step(self, renders_bxhxwx3: torch.Tensor, cameras: Cameras, step: int, total: int) -> float:
        """One DreamBooth round: restore the renders at t′(step), then `finetune_iters` LoRA updates."""
        restored = self.restore(renders_bxhxwx3.detach(), cameras, self.restore_t(step, total))
        with torch.no_grad():
            x0 = self.prior.encode(restored)
        losses = [self._train_adapter(self.dreambooth, x0, cameras) for _ in range(self.config.finetune_iters)]
        return sum(losses) / max(len(losses), 1)

    def vsd_step(self, renders_bxhxwx3: torch.Tensor, cameras: Cameras) -> float:
        """One update of the VSD LoRA towards the score of the current renders."""
        with torch.no_grad():
            x0 = self.prior.encode(renders_bxhxwx3.detach())
        return self.vsd_step_on(x0, cameras)

    def vsd_step_on(self, x0: torch.Tensor, cameras: Cameras) -> float:
        """`vsd_step` on x₀ already in the prior's space."""
        return self._train_adapter(self.vsd, x0, cameras)

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
            eps_dreambooth = self._guided_dreambooth(x_t, t_b, cameras)
            eps_vsd = noise
            if self.trainable:
                with self._adapter(self.vsd, cameras):
                    eps_vsd = self.prior.predict_noise(x_t, t_b, self._cond(cameras))
            w_b = (1.0 - self.prior.alphas_cumprod_t[t_b]).view(-1, 1, 1, 1)
            grad = torch.nan_to_num(w_b * (eps_dreambooth - eps_vsd))
        loss = target_loss(x0, grad)
        return loss, SDSInfo(t_b=t_b, noise=noise, grad=grad, grad_norm=float(grad.flatten(1).norm(dim=1).mean()))

    # ------------------------------------------------------------------ the alternation

    def step(
        self, rgb_bxhxwx3: torch.Tensor, cameras: Cameras, step: int, total: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One texture step: bootstrap the DreamBooth LoRA now and then, fit the VSD LoRA, distil."""
        parts: dict[str, float] = {}
        # 1. Every `finetune_every` steps: a DreamBooth round on freshly restored renders.
        if self.trainable and self.config.bootstrap and step % max(self.config.finetune_every, 1) == 0:
            parts["dreambooth"] = self.finetune_step(rgb_bxhxwx3, cameras, step, total)
            parts["restore_t"] = self.restore_t(step, total)
        # 2. The VSD LoRA follows the renders as they are now.
        if self.trainable:
            parts["vsd_lora"] = self.vsd_step(rgb_bxhxwx3, cameras)
        # 3. The texture gradient from the difference of the two scores.
        loss, info = self.texture_loss(rgb_bxhxwx3, cameras, self.config.t_range)
        parts["bsd"] = float(loss.detach())
        parts["grad_norm"] = info.grad_norm
        if not math.isfinite(parts["bsd"]):
            raise FloatingPointError(f"BSD loss is {parts['bsd']} at step {step}")
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

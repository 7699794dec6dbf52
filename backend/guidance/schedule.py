"""The hybrid guidance of DreamCraft3D's geometry stages: L = λ_sd·L_SDS + λ_3d·L_3D-SDS, annealed t.

    anneal_t_range(step, total, start=(0.7, 0.85), end=(0.2, 0.5)) -> (t_lo, t_hi)
    HybridConfig                  λ_sd, λ_3d, annealing length and ranges, guidance scales, Perp-Neg
    HybridGuidance(models, embeddings, reference, reference_camera, config)
        .loss(rgb_bxhxwx3, cameras, step, generator, rgb_3d_bxhxwx3=None)
            -> (loss, {"sds": ..., "sds_3d": ..., "grad_sds": ..., "grad_sds_3d": ..., "t_lo": ...})
        .close()                  remove what the 2D method put on the shared UNet (VSD's LoRA)

The timestep range moves linearly from `start` to `end` over `anneal_steps` steps and stays at
`end` afterwards: large t early (shape), small t late (detail); Zero123 may have its own ranges.
Zero123 sees `rgb_3d_bxhxwx3` (renders composited over white, as it was trained) when given,
the 2D prior `rgb_bxhxwx3`. Without a reference image (or without a Zero123 model) the 3D term
is left out. `grad_sds` and `grad_sds_3d` are the weighted gradient norms each term puts on its
prior's x₀ (λ·mean per-sample ‖w(t)(ε̂ − ε)‖), so the balance of the two can be read off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend.cameras import Cameras
from backend.config import DistillConfig
from backend.guidance.distill import Distiller
from backend.guidance.models import GuidanceModels
from backend.guidance.sds import PromptEmbeddings
from backend.guidance.zero123 import zero123_pose, zero123_sds_loss


def anneal_t_range(
    step: int,
    total: int,
    start: tuple[float, float] = (0.7, 0.85),
    end: tuple[float, float] = (0.2, 0.5),
) -> tuple[float, float]:
    """The [t_lo, t_hi] range (fractions of T) at `step` of an annealing lasting `total` steps."""
    if total <= 0:
        raise ValueError(f"total: expected a positive number of annealing steps, got {total}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    fraction = min(step / total, 1.0)
    t_lo = start[0] + (end[0] - start[0]) * fraction
    t_hi = start[1] + (end[1] - start[1]) * fraction
    return (t_lo, t_hi)


@dataclass
class HybridConfig:
    """Settings of the hybrid SDS of the coarse and geometry stages."""

    sds_weight: float = 0.1
    """Weight λ_sd of the 2D prior's SDS term (DreamCraft3D: 0.1)."""
    zero123_weight: float = 0.1
    """Weight λ_3d of the Zero123 3D-SDS term (DreamCraft3D: 0.1)."""
    anneal_steps: int = 200
    """Steps over which the timestep range moves from t_start to t_end."""
    t_start: tuple[float, float] = (0.7, 0.85)
    """Timestep range (fractions of T) at step 0."""
    t_end: tuple[float, float] = (0.2, 0.5)
    """Timestep range from `anneal_steps` on."""
    t_start_3d: tuple[float, float] | None = None
    """Zero123's timestep range at step 0 (None: the 2D prior's)."""
    t_end_3d: tuple[float, float] | None = None
    """Zero123's timestep range from `anneal_steps` on (None: the 2D prior's)."""
    guidance_scale_2d: float = 20.0
    """Classifier-free guidance scale of the 2D prior (SDS needs a large one)."""
    guidance_scale_3d: float = 5.0
    """Classifier-free guidance scale of Zero123."""
    perp_neg: bool = False
    """Use Perp-Neg for the 2D prior (four UNet passes per sample instead of two; SDS only)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The 2D prior's score-distillation method (`backend.guidance.distill`)."""


class HybridGuidance:
    """λ_sd·L_SDS (text prior, view-dependent prompt) + λ_3d·L_3D-SDS (Zero123, reference image)."""

    def __init__(
        self,
        models: GuidanceModels,
        embeddings: PromptEmbeddings,
        reference: object | None,
        reference_camera: tuple[float, float, float],
        config: HybridConfig,
    ) -> None:
        """`reference` is `models.zero123.encode_reference(...)` of the reference image (None for
        text-only jobs); `reference_camera` is (elevation_deg, azimuth_deg, distance) of its view."""
        if models.prior2d is None:
            raise ValueError("models: HybridGuidance needs the prior2d role loaded")
        self.models = models
        self.embeddings = embeddings
        self.reference = reference if models.zero123 is not None else None
        self.reference_camera = reference_camera
        self.config = config
        self.distiller = Distiller(models.prior2d, embeddings, config.distill, perp_neg=config.perp_neg)

    @property
    def uses_zero123(self) -> bool:
        """True when the 3D-SDS term is active (a reference and a Zero123 model are present)."""
        return self.reference is not None

    def t_range(self, step: int) -> tuple[float, float]:
        """The 2D prior's annealed timestep range at `step`."""
        return anneal_t_range(step, self.config.anneal_steps, self.config.t_start, self.config.t_end)

    def t_range_3d(self, step: int) -> tuple[float, float]:
        """Zero123's annealed timestep range at `step`."""
        config = self.config
        start = config.t_start_3d if config.t_start_3d is not None else config.t_start
        end = config.t_end_3d if config.t_end_3d is not None else config.t_end
        return anneal_t_range(step, config.anneal_steps, start, end)

    def loss(
        self,
        rgb_bxhxwx3: torch.Tensor,
        cameras: Cameras,
        step: int,
        generator: torch.Generator,
        rgb_3d_bxhxwx3: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted hybrid loss of renders [B, H, W, 3] in [0, 1] seen from `cameras`, and the
        parts for logging; Zero123 sees `rgb_3d_bxhxwx3` when given (renders over white), else
        `rgb_bxhxwx3`."""
        config = self.config
        t_range = self.t_range(step)
        # 1. 2D score distillation with the text prior (SDS unless configured otherwise).
        loss_2d, info_2d = self.distiller.loss(rgb_bxhxwx3, cameras, t_range, config.guidance_scale_2d, generator)
        parts = {"sds": float(loss_2d.detach()), "grad_sds": config.sds_weight * info_2d.grad_norm,
                 "t_lo": t_range[0], "t_hi": t_range[1]}
        if not self.uses_zero123:
            return config.sds_weight * loss_2d, parts
        # 2. Zero123 3D-SDS relative to the reference view.
        z123 = self.models.zero123
        rgb_3d = rgb_bxhxwx3 if rgb_3d_bxhxwx3 is None else rgb_3d_bxhxwx3
        pose_bx4 = zero123_pose(cameras.elevation_deg_b, cameras.azimuth_deg_b, cameras.distance_b,
                                *self.reference_camera, variant=z123.variant)
        loss_3d, info_3d = zero123_sds_loss(
            z123, rgb_3d, self.reference, pose_bx4.to(rgb_3d.device), self.t_range_3d(step),
            config.guidance_scale_3d, generator
        )
        parts["sds_3d"] = float(loss_3d.detach())
        parts["grad_sds_3d"] = config.zero123_weight * info_3d.grad_norm
        return config.sds_weight * loss_2d + config.zero123_weight * loss_3d, parts

    def close(self) -> None:
        """Free what the method holds on the shared UNet (VSD's LoRA)."""
        self.distiller.close()

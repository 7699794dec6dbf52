"""The reconstruction benchmark: a tiny CPU run on spot, and every bad-input case (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from backend.bench import main

ROOT = Path(__file__).resolve().parents[2]
MESHES = ROOT / ".." / "shared" / "meshes"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "backend.bench", "reconstruct", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
def test_tiny_reconstruction_of_spot_beats_the_initial_sphere(tmp_path: Path, device: str) -> None:
    out = tmp_path / "spot"
    result = run_bench(
        "--mesh", str(MESHES / "spot.obj"), "--texture", str(MESHES / "spot_texture.png"),
        "--quality", "tiny", "--device", device, "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    # Geometry: far better than the sphere NeuS starts from.
    sphere = metrics["sphere"]
    assert metrics["f_score"] >= sphere["f_score"] + 0.2, metrics
    assert metrics["chamfer"] <= 0.5 * sphere["chamfer"], metrics
    assert metrics["normal_consistency"] > sphere["normal_consistency"], metrics
    # Texture: held-out renders resemble the ground truth (white background included).
    assert 15.0 < metrics["psnr"] < 60.0, metrics
    for key in ("seconds", "peak_mem_gb", "precision", "recall", "psnr_object"):
        assert metrics[key] > 0, key
    assert set(metrics["stage_seconds"]) == {"render_gt", "neus", "dmtet", "decimate", "color", "unwrap", "bake",
                                             "export", "metrics"}
    # The DMTet surface was decimated to tiny's budget before unwrapping; the full one is scored too.
    assert metrics["faces_full"] > 5000 and 0.95 * 5000 <= metrics["faces"] <= 5000, metrics
    assert abs(metrics["f_score"] - metrics["full"]["f_score"]) < 0.05, metrics
    # Outputs: a textured GLB trimesh can read, an OBJ with its MTL and PNG, comparison images.
    glb = trimesh.load(out / "reconstruction.glb", force="mesh", process=False)
    assert len(glb.faces) == metrics["faces"]
    texture = np.asarray(glb.visual.material.baseColorTexture.convert("RGB"))
    assert texture.shape == (256, 256, 3) and texture.std() > 5.0
    assert {p.name for p in out.iterdir()} >= {
        "reconstruction.glb", "reconstruction.obj", "reconstruction.mtl", "reconstruction.png",
        "compare_00.png", "compare_01.png", "compare_02.png", "result.json",
    }
    assert json.loads((out / "result.json").read_text())["chamfer"] == metrics["chamfer"]


def test_missing_mesh_exits_2_with_one_line_from_the_command_line(tmp_path: Path) -> None:
    result = run_bench("--mesh", str(tmp_path / "nowhere.obj"), "--quality", "tiny", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere.obj: file not found" in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


TRIANGLE = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


@pytest.mark.parametrize(
    ("files", "flags", "message"),
    [
        ({"empty.obj": ""}, ["--mesh", "empty.obj"], "empty.obj: file is empty"),
        ({"quad.obj": "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n"}, ["--mesh", "quad.obj"], "quad.obj: face 0 (line 5) has 4 corners"),
        ({"range.obj": "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n"}, ["--mesh", "range.obj"], "range.obj: face 0 (line 4) has index 4 but the mesh has 3 vertices"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--views", "1"], "--views 1: need at least 2 training views"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--quality", "huge"], "argument --quality: invalid choice: 'huge'"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--device", "tpu"], "--device tpu"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--texture", "none.png"], "none.png: texture file not found"),
        ({"t.obj": TRIANGLE, "tex.png": None}, ["--mesh", "t.obj", "--texture", "tex.png"], "--texture tex.png: t.obj has no texture coordinates"),
        ({"t.obj": TRIANGLE, "out": ""}, ["--mesh", "t.obj", "--out", "out"], "--out out: exists and is not a folder"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--views", "many"], "argument --views: invalid int value: 'many'"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--steps", "neus=0"], "--steps neus=0: expected at least 1 step"),
        ({"t.obj": TRIANGLE}, ["--mesh", "t.obj", "--steps", "coarse=5"], "--steps: expected neus=N,dmtet=N,color=N, got 'coarse=5'"),
    ],
)
def test_bad_input_exits_2_naming_the_file_or_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, files: dict, flags: list, message: str
) -> None:
    from PIL import Image

    for name, content in files.items():
        if content is None:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    argv = ["reconstruct", *flags] + ([] if "--out" in flags else ["--out", "o"])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "t.obj").write_text(TRIANGLE)
    assert main(["reconstruct", "--mesh", str(tmp_path / "t.obj"), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_presets_are_documented() -> None:
    from backend.bench_reconstruct import PRESETS

    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    for name, preset in PRESETS.items():
        assert f"| {name} |" in docs, name
        assert f"| {preset.neus_steps} |" in docs or f"| {preset.neus_steps:,} |" in docs, name


def test_steps_cut_the_preset_and_nothing_else(tmp_path: Path) -> None:
    from backend.bench import build_parser, reconstruct_options
    from backend.bench_reconstruct import PRESETS

    (tmp_path / "t.obj").write_text(TRIANGLE)
    args = build_parser().parse_args(["reconstruct", "--mesh", str(tmp_path / "t.obj"), "--quality", "standard",
                                      "--steps", "neus=7,color=3", "--out", str(tmp_path / "o")])
    preset = reconstruct_options(args).preset
    standard = PRESETS["standard"]
    assert (preset.neus_steps, preset.color_steps, preset.dmtet_steps) == (7, 3, standard.dmtet_steps)
    assert preset.image_size == standard.image_size and preset.neus_rays == standard.neus_rays

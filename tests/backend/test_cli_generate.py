"""`python -m backend generate|refine`: flags become validated params; bad ones exit 2 with one
line naming the flag; the local context writes events, steps, previews and checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.cli_generate import (
    EXIT_BAD_INPUT,
    LocalContext,
    build_parser,
    flag_for_field,
    inputs_from_args,
    main,
    params_from_args,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MESHES = REPO_ROOT / ".." / "shared" / "meshes"


def _write_png(path: Path, size: int = 8) -> Path:
    from PIL import Image

    Image.new("RGBA", (size, size), (200, 30, 30, 255)).save(path)
    return path


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--out", "X"], "--prompt"),
        (["generate", "--prompt", "a cat"], "--out"),
        (["generate", "--prompt", "", "--out", "X"], "--prompt"),
        (["generate", "--prompt", "a cat", "--out", "X", "--elevation", "50,10"], "--elevation"),
        (["generate", "--prompt", "a cat", "--out", "X", "--elevation", "10"], "--elevation"),
        (["generate", "--prompt", "a cat", "--out", "X", "--azimuth", "-200,0"], "--azimuth"),
        (["generate", "--prompt", "a cat", "--out", "X", "--quality", "ultra"], "--quality"),
        (["generate", "--prompt", "a cat", "--out", "X", "--steps", "coarse=abc"], "--steps"),
        (["generate", "--prompt", "a cat", "--out", "X", "--steps", "shading=3"], "--steps"),
        (["generate", "--prompt", "a cat", "--out", "X", "--steps", "coarse=-1"], "--steps"),
        (["generate", "--prompt", "a cat", "--out", "X", "--steps", "coarse=0"], "--steps"),
        (["generate", "--prompt", "a cat", "--out", "X", "--seed", "-3"], "--seed"),
        (["generate", "--prompt", "a cat", "--out", "X", "--texture-size", "300"], "--texture-size"),
        (["generate", "--prompt", "a cat", "--out", "X", "--mesh-every", "5"], "--mesh-every"),
        (["generate", "--prompt", "a cat", "--out", "X", "--image", "/nonexistent.png"], "--image"),
        (["refine", "--prompt", "a cow", "--out", "X", "--mesh", "/nonexistent.obj"], "--mesh"),
        (["refine", "--prompt", "a cow", "--out", "X", "--mesh", "M", "--steps", "coarse=5"], "--steps"),
        (["generate", "--prompt", "a cow", "--out", "X", "--distill", "dds"], "--distill"),
        (["refine", "--prompt", "a cow", "--out", "X", "--mesh", "M", "--texture", "/nonexistent.png"],
         "--texture"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / "out") if a == "X" else a for a in argv]
    argv = [str(MESHES / "spot.obj") if a == "M" else a for a in argv]
    with pytest.raises(SystemExit) as raised:
        code = main(argv)
        raise SystemExit(code)
    assert raised.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert flag in err, err
    assert not (tmp_path / "out" / "events.jsonl").exists(), "nothing may run on bad input"


def test_a_broken_image_file_names_the_image_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    code = main(["generate", "--prompt", "a cat", "--image", str(broken), "--out", str(tmp_path / "o")])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--image" in err, err


def test_unknown_models_folder_names_the_models_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--prompt", "a cat", "--models", str(tmp_path / "nowhere"), "--device", "cpu",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--models" in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_the_device_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--prompt", "a cat", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device" in err, err


def test_flags_become_the_params_submit_validates(tmp_path: Path) -> None:
    image = _write_png(tmp_path / "ref.png")
    args = build_parser().parse_args([
        "generate", "--prompt", "a red chair", "--negative", "blurry", "--quality", "draft",
        "--steps", "coarse=20,geometry=0,texture=5", "--seed", "7", "--elevation", "0,30",
        "--azimuth", "-90,90", "--reference", "5,10,3.5,25", "--texture-size", "512",
        "--mesh-every", "10", "--preview-every", "2", "--image", str(image), "--out", str(tmp_path / "o"),
        "--distill", "nfsd",
    ])
    params_map = params_from_args(args)
    inputs = inputs_from_args(args)
    params = validate("generate", params_map, inputs)
    assert params.prompt == "a red chair" and params.negative_prompt == "blurry"
    assert params.quality == "draft" and params.seed == 7 and params.texture_size == 512
    assert params.distill == "nfsd"
    assert (params.steps.coarse, params.steps.geometry, params.steps.texture) == (20, 0, 5)
    assert params.camera.elevation_deg == (0.0, 30.0) and params.camera.azimuth_deg == (-90.0, 90.0)
    assert params.camera.reference.distance == 3.5 and params.camera.reference.fov_deg == 25.0
    assert params.mesh_every == 10 and params.preview_every == 2
    assert inputs["image"] == image.read_bytes()


def test_refine_flags_carry_the_mesh_with_uvs_and_texture(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "refine", "--mesh", str(MESHES / "spot.obj"), "--texture", str(MESHES / "spot_texture.png"),
        "--prompt", "a cow", "--out", str(tmp_path / "o"),
    ])
    inputs = inputs_from_args(args)
    params = validate("refine_texture", params_from_args(args), inputs)
    assert params.prompt == "a cow"
    positions, faces, uvs = inputs["positions"], inputs["faces"], inputs["uvs"]
    assert positions.dtype == np.dtype("<f4") and faces.dtype == np.dtype("<i4")
    assert uvs.shape == (len(positions), 2) and faces.max() < len(positions)
    assert inputs["texture"] == (MESHES / "spot_texture.png").read_bytes()
    # Every corner keeps its own position and UV after the split.
    from backend.meshio import load_mesh

    mesh = load_mesh(MESHES / "spot.obj", triangulate=True)
    np.testing.assert_allclose(positions[faces], mesh.verts_vx3[mesh.faces_fx3], atol=0)
    np.testing.assert_allclose(uvs[faces], mesh.uvs_fx3x2, atol=1e-7)


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("params.camera.elevation_deg", "--elevation"),
        ("params.camera.reference.fov_deg", "--reference"),
        ("params.steps.coarse", "--steps"),
        ("params.texture_size", "--texture-size"),
        ("buffers.image", "--image"),
        ("buffers.positions", "--mesh"),
        ("buffers.texture", "--texture"),
        ("params.prompt", "--prompt"),
    ],
)
def test_protocol_fields_map_back_to_flags(field: str, flag: str) -> None:
    assert flag_for_field(field) == flag


def _context(tmp_path: Path) -> LocalContext:
    params = validate("generate", {"prompt": "a cat"}, {})
    return LocalContext(out_dir=tmp_path, kind="generate", params=params, inputs={}, show_progress=False)


def test_local_context_writes_events_meshes_previews_and_checkpoints(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    ctx.open("key-1")
    assert not ctx.resumed and ctx.load_checkpoint() is None
    assert ctx.emit("stage", {"stage": "coarse", "steps": 3}) == 1
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    faces = np.array([[0, 1, 2]], dtype=np.int32)
    seq = ctx.emit("mesh", {"stage": "coarse", "step": 2, "final": False},
                   {"positions": verts, "faces": faces})
    ctx.progress("coarse", 2, 3, preview_png=b"\x89PNG fake")
    ctx.save_checkpoint(b"state-1")
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, seq] == [1, 2]
    assert lines[1]["file"] == "steps/coarse_000002.glb"
    assert lines[1]["buffers"]["positions"] == {"dtype": "f4", "shape": [3, 3]}
    import trimesh

    loaded = trimesh.load(tmp_path / "steps" / "coarse_000002.glb", force="mesh")
    assert len(loaded.faces) == 1
    assert (tmp_path / "previews" / "coarse_000002.png").read_bytes() == b"\x89PNG fake"
    # 1. The same job again in the same folder resumes: checkpoint kept, seqs continue.
    again = _context(tmp_path)
    again.open("key-1")
    assert again.resumed and again.load_checkpoint() == b"state-1"
    assert again.emit("stage", {"stage": "geometry", "steps": 3}) == 3
    # 2. Another job in the same folder starts afresh.
    other = _context(tmp_path)
    other.open("key-2")
    assert not other.resumed and other.load_checkpoint() is None
    assert not (tmp_path / "events.jsonl").exists() and not any((tmp_path / "steps").iterdir())


def test_local_context_cancel_raises_job_cancelled(tmp_path: Path) -> None:
    from backend.jobs import JobCancelled

    ctx = _context(tmp_path)
    ctx.open("key")
    ctx.check_cancelled()
    ctx.request_cancel()
    with pytest.raises(JobCancelled):
        ctx.check_cancelled()


def test_help_lists_both_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backend", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "generate" in out.stdout and "refine" in out.stdout

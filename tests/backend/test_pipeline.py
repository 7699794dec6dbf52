"""The whole pipeline on the CPU with the tiny models: generate (text only and with an image),
refine keeping the geometry, cancel within a step, a diverged job failing with a reason, and a
CLI process killed in the geometry stage that resumes from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cli_generate import LocalContext, main
from backend.config import config_for_job
from backend.jobs import JobCancelled
from backend.pipeline import Job, JobFailed, make_runner
from protocol.params import validate_submit

REPO_ROOT = Path(__file__).resolve().parents[2]
MESHES = REPO_ROOT / ".." / "shared" / "meshes"
TINY = ["--models", "tiny", "--device", "cpu", "--texture-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def runner():
    return make_runner("tiny", "cpu")


def read_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def load_glb(path: Path):
    import trimesh

    return trimesh.load(path, force="mesh")


def reference_png(path: Path, size: int = 64) -> Path:
    """A red disc with a darker band on a transparent background: an object and its mask."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 8, size - 12, size - 8), fill=(210, 40, 30, 255))
    draw.rectangle((12, size // 2 - 4, size - 12, size // 2 + 4), fill=(90, 20, 10, 255))
    image.save(path)
    return path


def assert_textured_glb(path: Path, xatlas_uvs: bool = True) -> None:
    mesh = load_glb(path)
    assert len(mesh.faces) > 0
    uv = mesh.visual.uv
    assert uv is not None and uv.shape == (len(mesh.vertices), 2)
    if xatlas_uvs:
        assert 0.0 <= uv.min() and uv.max() <= 1.0
    image = mesh.visual.material.baseColorTexture
    assert image is not None and image.size == (256, 256)
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0, "the baked texture is one flat colour"


def test_generate_text_only_streams_three_stages_and_a_textured_glb(tmp_path: Path) -> None:
    out = tmp_path / "cat"
    code = main(["generate", "--prompt", "a cat", "--steps", "coarse=11,geometry=2,texture=2",
                 "--mesh-every", "10", "--preview-every", "5", "--out", str(out), *TINY])
    assert code == 0
    events = read_events(out)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["coarse", "geometry", "texture"]
    meshes = [e for e in events if e["event"] == "mesh"]
    # Every mesh_every steps and at each stage end, then the final one.
    assert [(m["stage"], m["step"]) for m in meshes] == [
        ("coarse", 10), ("coarse", 11), ("geometry", 2), ("texture", 2), ("texture", 2)]
    assert [m["final"] for m in meshes] == [False] * 4 + [True]
    assert meshes[-1]["buffers"]["uvs"]["shape"][1] == 2 and "texture" in meshes[-1]["buffers"]
    assert events[-1] == {**events[-1], "event": "state", "state": "done"}
    # Every streamed mesh is a GLB trimesh loads; the coarse ones lie inside the scene cube.
    for mesh in meshes:
        loaded = load_glb(out / mesh["file"])
        assert len(loaded.faces) == mesh["face_count"] > 0
    assert np.abs(np.asarray(meshes[0]["bbox"])).max() <= 1.0
    assert_textured_glb(out / "model.glb")
    assert sorted(p.name for p in (out / "previews").iterdir())[:2] == ["coarse_000005.png", "coarse_000010.png"]
    assert not (out / "checkpoint.pt").exists()


class StoppingContext(LocalContext):
    """The CLI's context, asking for a cancel (as Ctrl-C does) once a given step has run."""

    stop_at: tuple[str, int] = ("coarse", 3)
    steps_seen: list

    def progress(self, stage, step, steps, eta_s=None, losses=None, preview_png=None) -> None:
        super().progress(stage, step, steps, eta_s, losses, preview_png)
        self.steps_seen.append((stage, step, dict(losses or {})))
        if (stage, step) == self.stop_at:
            self.request_cancel()


def _context(tmp_path: Path, kind: str, params: dict, inputs: dict) -> StoppingContext:
    ctx = StoppingContext(out_dir=tmp_path, kind=kind, params=validate_submit(kind, params, inputs),
                          inputs=inputs, show_progress=False)
    ctx.steps_seen = []
    ctx.open("test")
    return ctx


def test_generate_with_an_image_uses_zero123_and_the_reference_losses(tmp_path: Path, runner) -> None:
    image = reference_png(tmp_path / "ref.png").read_bytes()
    ctx = _context(tmp_path / "out", "generate", {
        "prompt": "a red ball", "steps": {"coarse": 4, "geometry": 2, "texture": 2},
        "texture_size": 256, "mesh_every": 10, "preview_every": 1,
    }, {"image": image})
    ctx.stop_at = ("none", -1)
    runner.run(ctx)
    coarse = [losses for stage, _, losses in ctx.steps_seen if stage == "coarse"]
    assert len(coarse) == 4
    assert {"sds", "sds_3d", "ref_rgb", "ref_mask"} <= set(coarse[0]), coarse[0]
    geometry = [losses for stage, _, losses in ctx.steps_seen if stage == "geometry"]
    assert "sds_3d" in geometry[0] and "ref_mask" in geometry[0]
    texture = [losses for stage, _, losses in ctx.steps_seen if stage == "texture"]
    assert "ref_rgb" in texture[0]
    events = read_events(tmp_path / "out")
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["coarse", "geometry", "texture"]
    assert sum(e["event"] == "mesh" for e in events) >= 2
    assert_textured_glb(tmp_path / "out" / "model.glb")


def test_refine_keeps_the_vertex_positions_of_spot(tmp_path: Path) -> None:
    from backend.meshio import load_mesh

    out = tmp_path / "spot"
    code = main(["refine", "--mesh", str(MESHES / "spot.obj"), "--texture", str(MESHES / "spot_texture.png"),
                 "--prompt", "a cow with orange spots", "--steps", "texture=4", "--mesh-every", "10",
                 "--out", str(out), *TINY])
    assert code == 0
    events = read_events(out)
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["texture"]
    spot = load_mesh(MESHES / "spot.obj")
    result = load_mesh(out / "model.glb")
    # Same corners in the same places (the GLB may split vertices along seams).
    np.testing.assert_allclose(result.verts_vx3[result.faces_fx3], spot.verts_vx3[spot.faces_fx3],
                               atol=1e-5)
    assert_textured_glb(out / "model.glb", xatlas_uvs=False)  # spot's own UVs, kept as sent


def test_cancel_stops_within_one_step(tmp_path: Path, runner) -> None:
    ctx = _context(tmp_path, "generate", {"prompt": "a cat", "steps": {"coarse": 12}, "mesh_every": 10}, {})
    ctx.stop_at = ("coarse", 3)
    with pytest.raises(JobCancelled):
        runner.run(ctx)
    assert [step for stage, step, _ in ctx.steps_seen] == [1, 2, 3]
    assert ctx.result_glb is None
    # A text-only job runs no image-conditioned guidance.
    losses = ctx.steps_seen[0][2]
    assert "sds" in losses and not {"sds_3d", "ref_rgb", "ref_mask"} & set(losses), losses


def test_a_job_resumed_mid_stage_continues_exactly_where_it_stopped(tmp_path: Path, runner) -> None:
    params = {"prompt": "a cat", "steps": {"coarse": 5}}

    def config_of(ctx):
        config = config_for_job(ctx.params, "tiny")
        return dataclasses.replace(config, stream=dataclasses.replace(config.stream, checkpoint_every=2))

    # 1. Straight through the coarse stage (stopped once it is done).
    straight = _context(tmp_path / "straight", "generate", params, {})
    straight.stop_at = ("coarse", 5)
    with pytest.raises(JobCancelled):
        Job(straight, config_of(straight), runner.guidance, runner.torch_device).run()
    # 2. Stopped after step 3 (newest checkpoint: after step 2), then resumed in a new context.
    stopped = _context(tmp_path / "stopped", "generate", params, {})
    stopped.stop_at = ("coarse", 3)
    with pytest.raises(JobCancelled):
        Job(stopped, config_of(stopped), runner.guidance, runner.torch_device).run()
    resumed = _context(tmp_path / "stopped", "generate", params, {})
    assert resumed.resumed
    resumed.stop_at = ("coarse", 5)
    with pytest.raises(JobCancelled):
        Job(resumed, config_of(resumed), runner.guidance, runner.torch_device).run()
    assert [step for _, step, _ in resumed.steps_seen] == [3, 4, 5]
    for (_, step, expected), (_, _, got) in zip(straight.steps_seen[2:], resumed.steps_seen):
        assert got == pytest.approx(expected, rel=1e-5), f"step {step}"


def test_a_checkpoint_of_another_release_starts_the_job_afresh_and_says_so(tmp_path: Path, runner) -> None:
    import json

    import safetensors.torch

    params = {"prompt": "a cat", "steps": {"coarse": 3}}
    first = _context(tmp_path, "generate", params, {})
    first.stop_at = ("coarse", 2)
    with pytest.raises(JobCancelled):
        runner.run(first)
    again = _context(tmp_path, "generate", params, {})
    assert again.resumed and again.load_checkpoint() is not None
    again.save_checkpoint(safetensors.torch.save({}, metadata={"dreamloom": json.dumps({"format": 2})}))
    again.stop_at = ("coarse", 2)
    with pytest.raises(JobCancelled):
        runner.run(again)
    assert [step for _, step, _ in again.steps_seen] == [1, 2]  # from the beginning, not from step 2
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    notes = [event["text"] for event in events
             if event["event"] == "note" and "another release" in event["text"]]
    assert len(notes) == 1 and "(checkpoint: format 2 is not 3)" in notes[0]


def test_a_diverging_job_fails_with_a_reason_and_keeps_its_meshes(tmp_path: Path, runner) -> None:
    ctx = _context(tmp_path, "generate", {"prompt": "a cat", "steps": {"coarse": 2, "geometry": 4}}, {})
    config = config_for_job(ctx.params, "tiny")
    # An infinite geometry learning rate: the tetrahedral grid blows up after its first step.
    config = dataclasses.replace(
        config, geometry=dataclasses.replace(config.geometry, lr=float("inf")),
        stream=dataclasses.replace(config.stream, mesh_every=1),
    )
    with pytest.raises(JobFailed, match=r"diverged \(.*\) at geometry step \d+; try another seed"):
        Job(ctx, config, runner.guidance, runner.torch_device).run()
    events = read_events(tmp_path)
    assert [(e["stage"], e["step"]) for e in events if e["event"] == "mesh"][:2] == [("coarse", 1), ("coarse", 2)]
    assert all((tmp_path / e["file"]).exists() for e in events if e["event"] == "mesh")


class OutOfMemoryContext(StoppingContext):
    """Raises the CUDA allocator's error during the geometry stage, as a GPU that runs out would
    (there is no GPU here to run out for real)."""

    def progress(self, stage, step, steps, eta_s=None, losses=None, preview_png=None) -> None:
        super().progress(stage, step, steps, eta_s, losses, preview_png)
        if (stage, step) == ("geometry", 1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_fails_with_the_settings_to_lower(tmp_path: Path, runner) -> None:
    params = {"prompt": "a cat", "steps": {"coarse": 1, "geometry": 3}, "texture_size": 2048}
    inputs: dict = {}
    ctx = OutOfMemoryContext(out_dir=tmp_path, kind="generate", params=validate_submit("generate", params, inputs),
                             inputs=inputs, show_progress=False)
    ctx.steps_seen, ctx.stop_at = [], ("none", -1)
    ctx.open("oom")
    with pytest.raises(JobFailed, match=r"ran out of memory in the geometry stage \(quality tiny, "
                                        r"32x32 renders, texture 2048\); try quality draft"):
        runner.run(ctx)
    assert any(e["event"] == "mesh" and e["stage"] == "coarse" for e in read_events(tmp_path))


def test_a_killed_cli_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "job"
    command = [sys.executable, "-m", "backend", "generate", "--prompt", "a cat",
               "--steps", "coarse=3,geometry=6,texture=2", "--mesh-every", "10", "--out", str(out), *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    # 1. Run until the geometry stage has started, then kill -9.
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            events = read_events(out) if (out / "events.jsonl").exists() else []
            if any(e["event"] == "stage" and e["stage"] == "geometry" for e in events):
                break
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        else:
            raise TimeoutError("the run never reached the geometry stage")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert (out / "checkpoint.pt").exists() and not (out / "model.glb").exists()
    before = read_events(out)
    # 2. The same command again resumes and finishes.
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    events = read_events(out)
    assert events[: len(before)] == before
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    restarted = events[len(before)]
    assert restarted["event"] == "state" and restarted["state"] == "running" and restarted["resumed"] is True
    after = events[len(before):]
    # It goes on from the stage it was killed in (geometry, or texture if that had begun).
    resumed_stages = [e["stage"] for e in after if e["event"] == "stage"]
    assert resumed_stages in (["geometry", "texture"], ["texture"]), \
        f"the run did not resume from its checkpoint: stages {resumed_stages}"
    assert after[-1]["state"] == "done"
    assert_textured_glb(out / "model.glb")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_with_an_image_on_cuda_ends_textured(tmp_path: Path) -> None:
    """The CUDA paths together (nvdiffrast, the Triton hash grid, float16 guidance, the device
    generator): the tiny models on the GPU, through the command line."""
    out = tmp_path / "gpu"
    image = reference_png(tmp_path / "ref.png")
    code = main(["generate", "--prompt", "a red ball", "--image", str(image), "--steps",
                 "coarse=4,geometry=2,texture=2", "--models", "tiny", "--device", "cuda",
                 "--texture-size", "256", "--no-progress", "--out", str(out)])
    assert code == 0
    events = read_events(out)
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["coarse", "geometry", "texture"]
    assert_textured_glb(out / "model.glb")


def test_zero123_encodes_the_reference_at_its_own_size_and_the_losses_at_the_render_size(
        tmp_path: Path, runner) -> None:
    from backend.guidance.reference import prepare_reference

    image = reference_png(tmp_path / "ref.png", size=128).read_bytes()
    ctx = _context(tmp_path / "out", "generate", {"prompt": "a red ball"}, {"image": image})
    config = config_for_job(ctx.params, runner.preset)
    job = Job(ctx, config, runner.guidance, runner.torch_device)
    job.reference_source = job._mask_reference()
    z123 = runner.guidance.zero123
    assert config.coarse.render_res < z123.resolution  # tiny: 16² renders, Zero123 sees 32²
    # Zero123's conditioning comes from the image prepared at Zero123's input size, not upsampled
    # from a render-size reference.
    at_z123_size = prepare_reference(image, size=z123.resolution, models=runner.guidance)
    expected = z123.encode_reference(at_z123_size.rgb_hxwx3, at_z123_size.mask_hxwx1)
    encoded = job._zero123_reference()
    torch.testing.assert_close(encoded.latents_1xcxhxw, expected.latents_1xcxhxw)
    torch.testing.assert_close(encoded.image_embeds_1x1xd, expected.image_embeds_1x1xd)
    # The reference view and its losses use each stage's render size.
    size = config.coarse.render_res
    assert tuple(job._reference(size).rgb_hxwx3.shape) == (size, size, 3)
    ref_cam = job._reference_camera(job._camera_ranges(), size)
    assert (ref_cam.height, ref_cam.width) == (size, size)

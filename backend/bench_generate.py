"""Generation benchmark: the real pipeline (all three stages) on oracle models of a known mesh,
scored against that mesh with the reconstruction bench's metrics.

Run it as `python -m backend.bench generate --mesh PATH ...` (see `backend.bench`). Steps:

1. load the oracle models of the mesh through `load_models("oracle:MESH[,TEXTURE]")`, the path
   `--models` takes (backend.guidance.oracle);
2. render the reference image from the oracle's reference view, alpha = the object's mask (none
   with `--text-only`);
3. run the job (`backend.pipeline.Job`, with the config a served job of that preset gets) in a
   local job folder (out/job: events, streamed meshes, the GLB), the stage loops exactly as a
   served job runs them;
4. score the last mesh each stage streamed and the final textured mesh: chamfer, F-score at 1 %,
   normal consistency (`backend.bench_reconstruct.mesh_metrics`), PSNR of the final mesh on
   held-out views, seconds per stage, peak memory; and, for comparison, the sphere NeuS starts from.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backend.cli_generate import LocalContext

DEFAULT_PROMPT = "the object"
"""The prompt sent with the job (the oracles read no text)."""
REFERENCE_SIZE = 256
"""Side of the rendered reference image, in pixels."""
SCORED_LIKE = {"small": "tiny"}
"""Pipeline presets the reconstruction bench has no preset of its own for, and the one whose
metric settings (sample points, held-out views) score them."""


@dataclass
class GenerateBenchOptions:
    """One generation benchmark run, as the command line gives it."""

    mesh: Path
    """The ground-truth mesh (.obj, .glb, .gltf)."""
    texture: Path | None
    """Its base-colour image, or None (the mesh's own, or the oracles' clay)."""
    quality: str
    """The pipeline preset: tiny, draft, standard or high."""
    out_dir: Path
    """Where the job folder and result.json go."""
    device: torch.device
    """Where everything runs."""
    text_only: bool = False
    """Send no reference image (the 2D oracle alone shapes the object)."""
    steps: dict[str, int] = field(default_factory=dict)
    """Per-stage step overrides (coarse, geometry, texture)."""
    camera: dict[str, Any] | None = None
    """The job's `camera` params (e.g. a reference view other than the oracle's), or None."""
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fields of the preset's stage configs to replace, e.g. {"coarse": {"mesh_res": 32}}."""
    seed: int = 0
    """The job's seed (and the metrics' samples)."""
    distill: str = "sds"
    """The job's `distill` param: the 2D prior's score-distillation method."""
    log: Callable[[str], None] = print
    """Where progress lines go."""


class RecordingContext(LocalContext):
    """A local job context that also keeps the newest mesh of each stage and when stages start."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meshes: dict[str, tuple[dict, dict]] = {}
        self.stage_started: dict[str, float] = {}

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int:
        if event == "mesh":
            self.meshes[body["stage"]] = (body, buffers or {})
        if event == "stage":
            self.stage_started[body["stage"]] = time.perf_counter()
        return super().emit(event, body, buffers)


def run_job(options: GenerateBenchOptions, models, reference_png: bytes | None) -> RecordingContext:
    """Step 3: the job through the pipeline runner, in out_dir/job."""
    from backend.cli_generate import job_key
    from backend.pipeline import Job
    from protocol.params import validate_submit

    params_map: dict[str, Any] = {"prompt": DEFAULT_PROMPT, "seed": options.seed, "steps": dict(options.steps),
                                  "preview_every": 10**6, "distill": options.distill}
    if options.camera is not None:
        params_map["camera"] = options.camera
    inputs = {} if reference_png is None else {"image": reference_png}
    params = validate_submit("generate", params_map, inputs)
    shutil.rmtree(options.out_dir / "job", ignore_errors=True)  # a bench run starts afresh, never resumes
    context = RecordingContext(out_dir=options.out_dir / "job", kind="generate", params=params, inputs=inputs,
                               show_progress=False)
    context.open(job_key("generate", {**params_map, "quality": options.quality,
                                      "overrides": options.stage_overrides}, inputs))
    context.state("running")
    Job(context, job_config(options, params), models, options.device).run()
    context.state("done")
    return context


def job_config(options: GenerateBenchOptions, params: Any):
    """The preset with the job's params applied (as a served job gets it), then the overrides."""
    import dataclasses

    from backend.config import config_for_job

    config = config_for_job(params, options.quality)
    stages = {stage: dataclasses.replace(getattr(config, stage), **fields)
              for stage, fields in options.stage_overrides.items()}
    return dataclasses.replace(config, **stages)


def final_psnr(obj, body_buffers: tuple[dict, dict], preset, device: torch.device) -> dict[str, float]:
    """PSNR of the final textured mesh against the object on the held-out views (white background)."""
    from PIL import Image

    from backend.bench_reconstruct import EVAL_ELEVATIONS_DEG, render_textured, ring_cameras
    from backend.metrics import psnr
    from backend.texture import UVMesh

    _, buffers = body_buffers
    uv_mesh = UVMesh(verts_vx3=np.asarray(buffers["positions"]), faces_fx3=np.asarray(buffers["faces"]),
                     uvs_vx2=np.asarray(buffers["uvs"]), vmapping_v=np.arange(len(buffers["positions"])))
    texture = np.asarray(Image.open(io.BytesIO(bytes(buffers["texture"]))).convert("RGB"))
    cameras = ring_cameras(preset.eval_views, EVAL_ELEVATIONS_DEG, 180.0 / preset.train_views + 7.0,
                           preset.image_size, device)
    ours_rgb, ours_mask = render_textured(obj.rasterizer, uv_mesh, texture, cameras, device)
    truth = obj.render(cameras)
    union = ((ours_mask + truth.mask) > 0).float()
    gt_rgb = truth.on_background()
    return {"psnr": round(psnr(ours_rgb, gt_rgb), 3), "psnr_object": round(psnr(ours_rgb, gt_rgb, union), 3)}


def start_sphere_metrics(obj, preset, seed: int, device: torch.device) -> dict[str, float]:
    """The scores of the sphere NeuS starts from (an icosphere of `NeuSConfig.sphere_radius`)."""
    import trimesh

    from backend.bench_reconstruct import mesh_metrics
    from backend.neus import NeuSConfig

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=NeuSConfig().sphere_radius)
    metrics = mesh_metrics(torch.as_tensor(sphere.vertices, dtype=torch.float32, device=device),
                           torch.as_tensor(sphere.faces, dtype=torch.int32, device=device),
                           obj.verts_vx3, obj.faces_fx3, preset, seed)
    return {k: round(v, 6) for k, v in metrics.as_dict().items()}


def generate(options: GenerateBenchOptions) -> dict:
    """Run the four steps; returns the result dict (also written to out_dir/result.json)."""
    from backend.bench_reconstruct import PRESETS, mesh_metrics, peak_memory_gb
    from backend.config import STAGES
    from backend.export import encode_png
    from backend.guidance.models import load_models

    device, log = options.device, options.log
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    # 1. The oracles.
    spec = f"oracle:{options.mesh}" + (f",{options.texture}" if options.texture is not None else "")
    models = load_models(spec, device)
    obj = models.prior2d.object
    log(f"oracle models of {options.mesh.name}: {len(obj.faces_fx3)} faces, framed in "
        f"{[round(v, 3) for v in obj.verts_vx3.min(0).values.tolist()]} .. "
        f"{[round(v, 3) for v in obj.verts_vx3.max(0).values.tolist()]}")
    # 2. The reference image.
    reference = None if options.text_only else encode_png(obj.reference_rgba(REFERENCE_SIZE))
    loaded = time.perf_counter()
    # 3. The pipeline.
    context = run_job(options, models, reference)
    finished = time.perf_counter()
    # 4. Scores: each stage's last streamed mesh, then the final one's colours.
    preset = PRESETS[SCORED_LIKE.get(options.quality, options.quality)]
    result: dict[str, Any] = {}
    for stage in STAGES:
        _, buffers = context.meshes[stage]
        metrics = mesh_metrics(torch.as_tensor(np.asarray(buffers["positions"]), device=device),
                               torch.as_tensor(np.asarray(buffers["faces"]), device=device),
                               obj.verts_vx3, obj.faces_fx3, preset, options.seed)
        result[stage] = {k: round(v, 6) for k, v in metrics.as_dict().items()}
        log(f"{stage}: f_score {result[stage]['f_score']:.4f} chamfer {result[stage]['chamfer']:.5f}")
    result["sphere"] = start_sphere_metrics(obj, preset, options.seed, device)
    final = result.pop("texture")
    result = {**final, **final_psnr(obj, context.meshes["texture"], preset, device), **result}
    starts = [context.stage_started[stage] for stage in STAGES] + [finished]
    result["stage_seconds"] = {"oracle_load": round(loaded - started, 3),
                               **{stage: round(starts[i + 1] - starts[i], 3) for i, stage in enumerate(STAGES)}}
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["peak_mem_gb"] = round(peak_memory_gb(device), 3)
    result["faces"] = int(len(context.meshes["texture"][1]["faces"]))
    result["device"] = str(device)
    result["quality"] = options.quality
    result["distill"] = options.distill
    config = job_config(options, context.params)
    result["steps"] = {stage: config.stage_steps(stage) for stage in STAGES}
    result["text_only"] = options.text_only
    result["models"] = models.names()
    (options.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result

"""Benchmark of the whole pipeline: per stage steps, ms per step and peak memory, and the time
from the job's start (model loading included) to the first streamed mesh.

    python -m backend.pipeline_bench --device cuda --quality standard
    python -m backend.pipeline_bench --device cpu --models tiny --steps coarse=4,geometry=2,texture=2

`--models full` (the default) builds the guidance models at full size with random weights (no
real weights are needed to time them); `tiny`, `default` or a folder load those instead. Results
are printed as a table and, with `--json PATH`, written as JSON.

With `--steps` capping a stage, its time is extrapolated to the preset's full step count: the
stage's measured seconds (hand-over work included once) plus the mean step time for each step
not run, plus, in the texture stage, the cost of each bootstrap round not run (the first step's
time beyond the mean: it holds the round of step 0). SIGTERM (a time slot's end) stops the job:
the report then holds the stages so far, the current one up to its last step, and `stopped`.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class StageTiming:
    """What one stage cost."""

    stage: str
    """coarse, geometry or texture."""
    steps: int
    """Steps it was to run."""
    steps_done: int = 0
    """Steps it ran (fewer than `steps` when the run was stopped in it)."""
    full_steps: int = 0
    """Steps of the preset (what `steps` was capped from)."""
    extrapolated_s: float = 0.0
    """`seconds` extrapolated to `full_steps` (see the module's docstring)."""
    seconds: float = 0.0
    """Wall time from its `stage` event to the next stage's (or the result)."""
    ms_per_step: float = 0.0
    """Mean wall time per step over the stage's steps (after the first, which warms up)."""
    peak_memory_gib: float = 0.0
    """Peak GPU memory allocated by torch during the stage (0 on the CPU)."""
    _step_times: list[float] = field(default_factory=list, repr=False)


@dataclass
class BenchReport:
    """The whole run."""

    device: str
    """The device, in words."""
    quality: str
    """The preset that ran."""
    models: str
    """The guidance models."""
    load_s: float = 0.0
    """Seconds to load (or build) the guidance models."""
    first_mesh_s: float = 0.0
    """Seconds from the start (model loading included) to the first streamed mesh."""
    total_s: float = 0.0
    """Seconds from the start to the result."""
    peak_memory_gib: float = 0.0
    """Peak GPU memory over the run."""
    checkpoint_mib: float = 0.0
    """Size of the largest checkpoint."""
    extrapolated_total_s: float = 0.0
    """`total_s` with every stage at its full step count."""
    stopped: str = ""
    """Why and where the run stopped early ("" when it ran to the end)."""
    stages: list[StageTiming] = field(default_factory=list)
    """Per stage."""


class SlotEnded(BaseException):
    """SIGTERM arrived: the run's time slot is over (a BaseException, so no job code catches it)."""


def _end_slot(signum, frame) -> None:
    raise SlotEnded()


class BenchContext:
    """A job context that only measures: events and checkpoints are timed and dropped."""

    def __init__(self, kind: str, params: Any, inputs: dict, report: BenchReport, started: float,
                 device: torch.device) -> None:
        self.job_id = "bench"
        self.kind = kind
        self.params = params
        self.inputs = inputs
        self.resumed = False
        self.report = report
        self.started = started
        self.device = device
        self.result: bytes | None = None
        self._stage: StageTiming | None = None
        self._stage_started = 0.0
        self._last_step_at = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close_stage(self) -> None:
        if self._stage is None:
            return
        self._sync()
        stage = self._stage
        stage.seconds = time.perf_counter() - self._stage_started
        stage.steps_done = len(stage._step_times)
        times = stage._step_times[1:] or stage._step_times
        stage.ms_per_step = 1000.0 * sum(times) / max(1, len(times))
        if self.device.type == "cuda":
            stage.peak_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._stage = None

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int:
        now = time.perf_counter()
        if event == "stage":
            self._close_stage()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._stage = StageTiming(stage=body["stage"], steps=int(body["steps"]))
            self.report.stages.append(self._stage)
            self._stage_started = self._last_step_at = now
        if event == "mesh" and self.report.first_mesh_s == 0.0:
            self.report.first_mesh_s = now - self.started
        if event in ("stage", "mesh"):  # a running log, so a long run shows where it is
            what = (f"stage {body['stage']} ({body['steps']} steps)" if event == "stage"
                    else f"mesh at {body['stage']} step {body['step']}")
            print(f"[{now - self.started:8.1f} s] {what}", file=sys.stderr, flush=True)
        return 0

    def progress(self, stage: str, step: int, steps: int, eta_s: float | None = None,
                 losses: dict | None = None, preview_png: bytes | None = None) -> None:
        self._sync()
        now = time.perf_counter()
        if self._stage is not None and self._stage.stage == stage:
            self._stage._step_times.append(now - self._last_step_at)
        self._last_step_at = now

    def check_cancelled(self) -> None:
        return None

    def save_checkpoint(self, state: bytes) -> None:
        self.report.checkpoint_mib = max(self.report.checkpoint_mib, len(state) / 2**20)

    def load_checkpoint(self) -> bytes | None:
        return None

    def set_result(self, glb: bytes) -> None:
        self._close_stage()
        self.result = glb


def bench_job_class(models: str):
    """The `Job` to time. With full-size random models there is no text or image encoder, so the
    prompt and reference encodings are random tensors of the real shapes (made once per job, they
    cost nothing per step); everything else is the pipeline's own code."""
    from backend.pipeline import Job

    if models != "full":
        return Job

    class RandomEncodingJob(Job):
        def _embeddings(self, view_dependent: bool, prior=None):
            return self.guidance.bench_embeddings  # the texture role is the 2D prior: the same shapes

        def _zero123_reference(self):
            return self.guidance.bench_reference if self.reference_source is not None else None

    return RandomEncodingJob


def load_bench_models(models: str, device: torch.device) -> Any:
    """Guidance models: "full" = full-size random-weight models (float16 on CUDA), else
    `load_models(models)`."""
    if models == "full":
        from backend.guidance.bench import full_size_models

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        guidance, embeddings, reference = full_size_models(device, dtype)
        guidance.bench_embeddings = embeddings
        guidance.bench_reference = reference
        return guidance
    from backend.guidance.models import load_models

    return load_models(models, device)


def run_bench(device: str, quality: str, models: str, steps: dict[str, int], image: Path | None,
              texture_size: int) -> BenchReport:
    """Run one generate job through the pipeline and measure it (until SIGTERM, if one comes)."""
    from backend.config import config_for_job
    from backend.pipeline import describe_device
    from protocol.params import validate_submit

    torch_device = torch.device(device)
    report = BenchReport(device=describe_device(torch_device), quality=quality, models=models)
    inputs = {"image": image.read_bytes()} if image is not None else {}
    params = validate_submit("generate", {
        "prompt": "a ceramic teapot with blue flowers", "quality": quality, "steps": steps,
        "texture_size": texture_size, "mesh_every": 250, "preview_every": 25,
    }, inputs)
    config = config_for_job(params, "tiny" if models == "tiny" else None)
    report.quality = config.quality
    started = time.perf_counter()
    ctx = BenchContext("generate", params, inputs, report, started, torch_device)
    try:
        # 1. Load the models (counted in the time to the first mesh, as a fresh server would).
        guidance = load_bench_models(models, torch_device)
        report.load_s = time.perf_counter() - started
        # 2. One generate job.
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch_device)
        bench_job_class(models)(ctx, config, guidance, torch_device).run()
    except SlotEnded:
        where = f"{ctx._stage.stage} step {len(ctx._stage._step_times)}" if ctx._stage else "before the first stage"
        ctx._close_stage()
        report.stopped = f"SIGTERM in {where}"
    report.total_s = time.perf_counter() - started
    if torch_device.type == "cuda" and report.stages:
        report.peak_memory_gib = max(stage.peak_memory_gib for stage in report.stages)
    extrapolate(report, config)
    return report


def extrapolate(report: BenchReport, config) -> None:
    """Each stage's time at the preset's full step count, and the whole run's."""
    from backend.config import PRESETS

    preset = PRESETS[config.quality]
    for stage in report.stages:
        stage.full_steps = preset.stage_steps(stage.stage)
        step_s = stage.ms_per_step / 1000.0
        missing_s = step_s * max(0, stage.full_steps - stage.steps_done)
        if stage.stage == "texture" and stage._step_times:
            every = max(config.texture.bootstrap_every, 1)
            rounds = math.ceil(stage.full_steps / every) - math.ceil(stage.steps_done / every)
            missing_s += max(0, rounds) * max(0.0, stage._step_times[0] - step_s)
        stage.extrapolated_s = stage.seconds + missing_s
    report.extrapolated_total_s = report.total_s + sum(s.extrapolated_s - s.seconds for s in report.stages)


def format_report(report: BenchReport) -> str:
    lines = [
        f"device {report.device}, quality {report.quality}, models {report.models}",
        f"model load {report.load_s:.1f} s; first mesh at {report.first_mesh_s:.1f} s; "
        f"total {report.total_s:.1f} s; peak {report.peak_memory_gib:.2f} GiB; "
        f"largest checkpoint {report.checkpoint_mib:.1f} MiB; at full steps {report.extrapolated_total_s:.1f} s"
        + (f"; stopped: {report.stopped}" if report.stopped else ""),
        "| stage | steps run / full | ms/step | seconds | at full steps (s) | peak GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage in report.stages:
        lines.append(f"| {stage.stage} | {stage.steps_done} / {stage.full_steps} | {stage.ms_per_step:.1f} | "
                     f"{stage.seconds:.1f} | {stage.extrapolated_s:.1f} | {stage.peak_memory_gib:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from backend.cli_generate import BadInput, parse_steps

    signal.signal(signal.SIGTERM, _end_slot)  # from here on a time slot's end still gives a report
    parser = argparse.ArgumentParser(prog="python -m backend.pipeline_bench", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quality", default="standard", choices=("draft", "standard", "high"))
    parser.add_argument("--models", default="full", help="full (random weights), tiny, default or DIR")
    parser.add_argument("--steps", help="coarse=N,geometry=N,texture=N overrides")
    parser.add_argument("--image", type=Path, help="a reference image (runs Zero123 too)")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        steps = parse_steps(args.steps, ("coarse", "geometry", "texture"))
    except BadInput as exc:
        parser.error(str(exc))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU")
    report = run_bench(args.device, args.quality, args.models, steps, args.image, args.texture_size)
    print(format_report(report))
    if args.json is not None:
        payload = asdict(report)
        for stage in payload["stages"]:
            stage.pop("_step_times", None)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 3 if report.stopped else 0


if __name__ == "__main__":
    sys.exit(main())

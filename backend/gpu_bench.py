"""The CUDA tests and the GPU benchmarks in one time budget: `python build.py gpu-bench`.

    python build.py gpu-bench [--system-python [--wheels DIR]] [--budget-s 480] [--device cuda|cpu]
                              [--only PART,...] [--out DIR] [--meshes DIR] [--dry-run]

Runs `PARTS` in order, each in a subprocess with its own time slot (the slots of a 480 s budget,
scaled to `--budget-s`; a part that ends early hands its rest to the next). At its slot's end a
part gets SIGTERM (the benches then report what they had), then SIGKILL. Each part's output goes
to `<out>/<part>.log`, its numbers into `<out>/summary.json`, and a table is printed at the end.

Before any part starts, one line on stderr and exit status 2 say what is wrong: torch without
CUDA or without a GPU, a package version the code does not work with, no nvcc to build
nvdiffrast's plugin, a missing mesh. `--dry-run` prints the plan, does those checks and runs
nothing. `--device cpu` runs the same parts at tiny sizes on the CPU (the CUDA-only ones are
skipped): the proof that the machinery works before a GPU window is spent on it.

Nothing here imports torch; the box is probed in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.system_python import ROOT, USAGE_ERROR, unfit_requirements

BUDGET_S = 480.0
"""The budget the slots of `PARTS` add up to."""
STANDARD_MESHES = ROOT.parent / "shared" / "meshes"
REFERENCE_IMAGE = ROOT / "docs" / "images" / "demo_reference.png"
"""The reference image the pipeline part runs with (so Zero123 runs, as in a real job)."""
TARGETS = {"total_min": 20.0, "peak_gib": 20e9 / 2**30, "first_mesh_s": 60.0, "step_ratio": 1.3}
"""The standard preset on one H100-class GPU: the whole run, its peak memory (20 GB), the first
streamed mesh, and a coarse pipeline step over the guidance bench's hybrid step."""


@dataclass(frozen=True)
class Part:
    """One subprocess of the plan."""

    name: str
    slot_s: float
    """Its seconds of a `BUDGET_S` budget."""
    what: str
    """One line for the plan."""
    cuda_args: tuple[str, ...]
    """`python` arguments on CUDA; `{out}`, `{meshes}`, `{image}` are filled in, `{tests}` expands."""
    cpu_args: tuple[str, ...] | None
    """The same machinery at tiny sizes on the CPU; None: CUDA only, skipped there."""


PARTS = (
    Part("nvdiffrast", 90, "build nvdiffrast's CUDA plugin (once per box; the later parts reuse it)",
         ("-m", "backend.nvdiffrast_loader"), None),
    Part("cuda-tests", 60, "pytest -m cuda: nvdiffrast vs the PyTorch twin, Triton hash grid vs PyTorch, fp16 guidance",
         ("-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", "--timeout", "120", "{tests}"),
         ("-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", "--timeout", "120", "{tests}")),
    Part("hashgrid", 10, "hash grid forward+backward, 262,144 points, PyTorch and Triton",
         ("-m", "backend.hashgrid", "--bench", "--device", "cuda", "--points", "262144", "--json", "{out}/hashgrid.json"),
         ("-m", "backend.hashgrid", "--bench", "--device", "cpu", "--points", "4096", "--repeats", "2",
          "--levels", "4", "--log2-table-size", "12", "--json", "{out}/hashgrid.json")),
    Part("neus", 15, "NeuS training step, 4,096 rays x 96 samples, with and without occupancy skipping",
         ("-m", "backend.neus", "--bench", "--device", "cuda", "--rays", "4096", "--samples", "96",
          "--json", "{out}/neus.json"),
         ("-m", "backend.neus", "--bench", "--device", "cpu", "--rays", "64", "--samples", "8", "--repeats", "1",
          "--levels", "4", "--log2-table-size", "12", "--json", "{out}/neus.json")),
    Part("raster-nvdiffrast", 20, "render_mesh forward+backward with nvdiffrast, 128²x4 and 512²x4 views",
         ("-m", "backend.raster", "bench", "--device", "cuda", "--kind", "nvdiffrast", "--configs", "128x4x5,512x4x6"),
         None),
    Part("raster-torch", 15, "the same with the PyTorch twin, 512²x4 views",
         ("-m", "backend.raster", "bench", "--device", "cuda", "--kind", "torch", "--configs", "512x4x6"),
         ("-m", "backend.raster", "bench", "--device", "cpu", "--kind", "torch", "--configs", "32x1x1")),
    Part("dmtet", 15, "DMTet from_sdf + extract + backward at 128³ and 192³",
         ("-m", "backend.dmtet", "bench", "128", "192", "--device", "cuda"),
         ("-m", "backend.dmtet", "bench", "16", "--device", "cpu")),
    Part("guidance", 55, "hybrid SDS step, BSD step and BSD round, full-size random UNets, fp16",
         ("-m", "backend.guidance.bench", "--device", "cuda", "--json", "{out}/guidance.json"),
         ("-m", "backend.guidance.bench", "--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "1",
          "--restore-steps", "1", "--finetune-iters", "1", "--render-res", "32", "--json", "{out}/guidance.json")),
    Part("pipeline", 125, "one standard generate job, steps capped (60/25/12), extrapolated to full steps",
         ("-m", "backend.pipeline_bench", "--device", "cuda", "--quality", "standard",
          "--steps", "coarse=60,geometry=25,texture=12", "--image", "{image}", "--json", "{out}/pipeline.json"),
         ("-m", "backend.pipeline_bench", "--device", "cpu", "--models", "tiny", "--steps", "coarse=3,geometry=2,texture=2",
          "--texture-size", "256", "--image", "{image}", "--json", "{out}/pipeline.json")),
    Part("reconstruct", 75, "spot rebuilt from its renders at standard sizes, steps cut to 1000/250/500",
         ("-m", "backend.bench", "reconstruct", "--mesh", "{meshes}/spot.obj", "--texture", "{meshes}/spot_texture.png",
          "--device", "cuda", "--quality", "standard", "--steps", "neus=1000,dmtet=250,color=500",
          "--out", "{out}/reconstruct"),
         ("-m", "backend.bench", "reconstruct", "--mesh", "{meshes}/spot.obj", "--texture", "{meshes}/spot_texture.png",
          "--device", "cpu", "--quality", "tiny", "--steps", "neus=10,dmtet=3,color=10", "--out", "{out}/reconstruct")),
)
"""The plan, in order; the slots add up to `BUDGET_S`."""


@dataclass
class Step:
    """One part as planned and as it ran."""

    name: str
    what: str
    command: list[str]
    """Full command line (empty when skipped)."""
    slot_s: float
    """Its slot, scaled to the budget."""
    ends_at_s: float
    """Seconds after the start by which it has ended (slots before it that ended early give it their rest)."""
    status: str = "planned"
    """planned, ok, failed (non-zero exit), stopped (its slot ended) or skipped."""
    exit_code: int | None = None
    seconds: float = 0.0
    log: str = ""
    results: Any = None
    """What it measured: its JSON file, else the JSON lines of its log, else (tests) the outcomes."""
    note: str = ""


@dataclass
class Summary:
    box: dict
    device: str
    budget_s: float
    started_at: str
    seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)
    targets: dict = field(default_factory=dict)


# 1. The plan ---------------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """Test files holding `cuda`-marked tests (the others are not collected at all)."""
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    return [str(path.relative_to(ROOT)) for path in files if "mark.cuda" in path.read_text()]


def plan(parts: tuple[Part, ...], device: str, budget_s: float, out: Path, meshes: Path) -> list[Step]:
    """Steps with their commands and slots (scaled so the selected parts fill `budget_s`)."""
    scale = budget_s / sum(part.slot_s for part in parts)
    values = {"out": str(out), "meshes": str(meshes), "image": str(REFERENCE_IMAGE)}
    steps, ends_at = [], 0.0
    for part in parts:
        args = part.cuda_args if device == "cuda" else part.cpu_args
        slot = part.slot_s * scale
        ends_at += slot
        command = []
        for arg in args or ():
            command += cuda_test_files() if arg == "{tests}" else [arg.format(**values)]
        step = Step(part.name, part.what, [sys.executable, *command] if args else [], slot, ends_at)
        if args is None:
            step.status, step.note = "skipped", "CUDA only"
        steps.append(step)
    return steps


def format_plan(steps: list[Step], device: str, budget_s: float) -> str:
    lines = [f"gpu-bench plan: {len(steps)} parts on {device} in {budget_s:.0f} s",
             "| # | part | slot s | ends by s | what |", "| --- | --- | --- | --- | --- |"]
    for index, step in enumerate(steps, 1):
        what = step.what + (f" ({step.note})" if step.note else "")
        lines.append(f"| {index} | {step.name} | {step.slot_s:.0f} | {step.ends_at_s:.0f} | {what} |")
    for step in steps:
        if step.command:
            lines.append(f"  {step.name}: python {' '.join(step.command[1:])}")
    return "\n".join(lines)


# 2. Checks before any part starts --------------------------------------------------------------------


def probe(env: dict[str, str]) -> dict:
    """torch, CUDA and the GPU as the parts will see them (a subprocess: no CUDA context here)."""
    code = (
        "import json, torch\n"
        "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu_available': torch.cuda.is_available()}\n"
        "if info['gpu_available']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f'{p.major}.{p.minor}')\n"
        "print(json.dumps(info))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"importing torch failed: {last}"}
    info = json.loads(result.stdout.strip().splitlines()[-1])
    info["python"] = sys.version.split()[0]
    info["executable"] = sys.executable
    return info


def nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def problems(steps: list[Step], box: dict, device: str, meshes: Path) -> list[str]:
    """Everything that stops the plan from running, each in a few words."""
    names = {step.name for step in steps if step.status != "skipped"}
    found = []
    if "error" in box:
        found.append(box["error"])
    elif device == "cuda" and not box["cuda"]:
        found.append(f"torch {box['torch']} was built without CUDA (use the box's own PyTorch, or --device cpu)")
    elif device == "cuda" and not box["gpu_available"]:
        found.append(f"torch {box['torch']} (CUDA {box['cuda']}) sees no GPU")
    needed = (["pytest>=8", "pytest-timeout>=2"] if "cuda-tests" in names else []) + (
        ["triton>=3.0"] if device == "cuda" else [])
    found += [f"needs {text}" for text in unfit_requirements(needed, sys.path)]
    if "nvdiffrast" in names and nvcc() is None:
        found.append("no nvcc to build nvdiffrast's plugin (put it on PATH or set CUDA_HOME)")
    if "reconstruct" in names and not (meshes / "spot.obj").is_file():
        found.append(f"--meshes {meshes}: no spot.obj there")
    return found


# 3. Running the parts ----------------------------------------------------------------------------------


def part_env() -> dict[str, str]:
    """The parts' environment: the repository on PYTHONPATH, unbuffered output, one plugin cache."""
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch-extensions"))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    return env


def run_step(step: Step, env: dict[str, str], log_path: Path, deadline: float) -> None:
    """Run one part until it exits or `deadline` (a `time.monotonic()` value): SIGTERM a few
    seconds before, so it can report what it had, SIGKILL at the deadline."""
    grace = min(5.0, 0.2 * step.slot_s)
    started = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ python {' '.join(step.command[1:])}\n")
        log.flush()
        process = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: children go too
        try:
            step.exit_code = process.wait(timeout=max(0.0, deadline - grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            step.exit_code = process.returncode
            step.status = "stopped"
            step.note = f"its slot ended after {time.monotonic() - started:.0f} s"
        with contextlib.suppress(ProcessLookupError):  # whatever of the part outlived it goes now
            os.killpg(process.pid, signal.SIGKILL)
    step.seconds = round(time.monotonic() - started, 2)
    if step.status != "stopped":
        step.status = "ok" if step.exit_code == 0 else "failed"
    step.log = str(log_path)


def json_lines(text: str) -> list[dict]:
    """The JSON objects printed one per line."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


TEST_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def read_results(step: Step, out: Path) -> Any:
    """What a finished (or stopped) part measured."""
    text = Path(step.log).read_text(errors="replace")
    if step.name == "cuda-tests":
        outcomes: dict[str, list[str]] = {}
        for line in text.splitlines():
            match = TEST_OUTCOME.match(line)
            if match:
                outcomes.setdefault(match.group(2).lower(), []).append(match.group(1))
        return {"counts": {key: len(value) for key, value in outcomes.items()},
                "failed": outcomes.get("failed", []) + outcomes.get("error", [])}
    own = out / f"{step.name}.json"
    if own.exists():
        return json.loads(own.read_text())
    return json_lines(text)


# 4. The table and the targets ------------------------------------------------------------------------


def _ms(value: Any) -> str:
    """A hash-grid result: (wall ms, CPU ms), or why that implementation cannot run."""
    return f"{value[0]:.2f} ms" if isinstance(value, list) else value.split(" (")[0]


def _describe(name: str, results: Any) -> str:
    """A few numbers of one part for the table."""
    if name == "cuda-tests":
        counts = ", ".join(f"{n} {key}" for key, n in sorted(results["counts"].items())) or "none ran"
        return counts + (f"; failed: {', '.join(results['failed'])}" if results["failed"] else "")
    if name == "nvdiffrast":
        return "; ".join(f"plugin ready in {line['seconds']:.0f} s" for line in results)
    if name == "hashgrid":
        return f"torch {_ms(results['torch'])}, triton {_ms(results['triton'])}"
    if name == "neus":
        return (f"{results['step_ms_occupancy']:.1f} ms/step with occupancy, "
                f"{results['step_ms_no_occupancy']:.1f} without")
    if name.startswith("raster"):
        return "; ".join(f"{r['size']}²x{r['batch']} {r['faces']} faces: {r['forward_ms']}+{r['backward_ms']} ms, "
                         f"{r['peak_mb']:.0f} MiB" for r in results)
    if name == "dmtet":
        return "; ".join(f"{r['resolution']}³: {r['from_sdf_s']}+{r['extract_s']}+{r['backward_s']} s, "
                         f"{r['peak_mb']:.0f} MiB" for r in results)
    if name == "guidance":
        return (f"hybrid {results['hybrid_step_ms']:.0f} ms, BSD step {results['bsd_step_ms']:.0f} ms, "
                f"BSD round {results['bsd_round_ms']:.0f} ms ({results['dtype']})")
    if name == "pipeline":
        stages = ", ".join(f"{s['stage']} {s['ms_per_step']:.0f} ms/step" for s in results["stages"])
        return (f"{stages}; first mesh {results['first_mesh_s']:.1f} s; full steps "
                f"{results['extrapolated_total_s'] / 60:.1f} min; peak {results['peak_memory_gib']:.1f} GiB"
                + (f"; stopped: {results['stopped']}" if results.get("stopped") else ""))
    if name == "reconstruct":
        result = results[-1]
        return (f"f_score {result['f_score']:.3f}, chamfer {result['chamfer']:.4f}, psnr {result['psnr']:.1f} dB, "
                f"{result['seconds']:.0f} s, {result['peak_mem_gb']:.1f} GB")
    return ""


def describe(step: Step) -> str:
    if step.status == "failed":
        lines = Path(step.log).read_text(errors="replace").strip().splitlines()
        last = f"exit {step.exit_code}: {lines[-1][:200] if lines else '(no output)'}"
        return "; ".join(part for part in (last, step.note) if part)
    if not step.results:  # what it printed last is what it had
        lines = Path(step.log).read_text(errors="replace").strip().splitlines() if step.log else []
        return "; ".join(part for part in (step.note, lines[-1][:200] if lines else "") if part)
    try:
        text = _describe(step.name, step.results)
    except (KeyError, TypeError, IndexError):  # a stopped part may have left half a report
        text = "partial output, see the log"
    return "; ".join(part for part in (text, step.note) if part)


def targets(steps: list[Step]) -> dict:
    """The standard preset's numbers against `TARGETS` (only those that were measured)."""
    found = {step.name: step.results for step in steps if step.status in ("ok", "stopped") and step.results}
    checks: dict[str, dict] = {}
    pipeline, guidance = found.get("pipeline"), found.get("guidance")
    if isinstance(pipeline, dict) and pipeline.get("stages") and pipeline.get("quality") == "standard":
        if {s["stage"] for s in pipeline["stages"]} == {"coarse", "geometry", "texture"}:  # not a stopped run
            checks["total_min"] = {"value": pipeline["extrapolated_total_s"] / 60}
            checks["peak_gib"] = {"value": pipeline["peak_memory_gib"]}
        if pipeline["first_mesh_s"] > 0:
            checks["first_mesh_s"] = {"value": pipeline["first_mesh_s"]}
        coarse = next((s for s in pipeline["stages"] if s["stage"] == "coarse"), None)
        if coarse and isinstance(guidance, dict):
            checks["step_ratio"] = {"value": coarse["ms_per_step"] / guidance["hybrid_step_ms"]}
    for key, check in checks.items():
        check["target"] = TARGETS[key]
        check["met"] = check["value"] <= TARGETS[key]
    return checks


def format_table(summary: Summary) -> str:
    box = summary.box
    where = box.get("gpu") or "CPU"
    lines = [
        f"gpu-bench: {where}, torch {box.get('torch')} (CUDA {box.get('cuda')}), Python {box.get('python')}; "
        f"{summary.seconds:.0f} s of a {summary.budget_s:.0f} s budget",
        "| part | status | s / slot | numbers |", "| --- | --- | --- | --- |",
    ]
    for step in summary.steps:
        lines.append(f"| {step.name} | {step.status} | {step.seconds:.0f} / {step.slot_s:.0f} | {describe(step)} |")
    labels = {"total_min": "standard run, full steps (min)", "peak_gib": "peak memory (GiB)",
              "first_mesh_s": "first mesh (s)", "step_ratio": "coarse step / hybrid guidance step"}
    for key, check in summary.targets.items():
        verdict = "met" if check["met"] else "MISSED"
        lines.append(f"target {labels[key]}: {check['value']:.2f} <= {check['target']:.2f}: {verdict}")
    return "\n".join(lines)


# 5. The command ----------------------------------------------------------------------------------------


def select(only: str | None) -> tuple[Part, ...]:
    if not only:
        return PARTS
    names = [name.strip() for name in only.split(",")]
    unknown = [name for name in names if name not in {part.name for part in PARTS}]
    if unknown:
        raise ValueError(f"--only {only}: no part {', '.join(unknown)} (parts: {', '.join(p.name for p in PARTS)})")
    return tuple(part for part in PARTS if part.name in names)


def write_summary(summary: Summary, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python build.py gpu-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for all parts (default {BUDGET_S:.0f})")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu: the same parts at tiny sizes")
    parser.add_argument("--only", help="comma-separated parts to run (their slots fill the budget)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-bench", help="logs and summary.json")
    parser.add_argument("--meshes", type=Path, default=STANDARD_MESHES, help="folder with spot.obj")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check; run nothing")
    args = parser.parse_args(argv)
    try:
        parts = select(args.only)
    except ValueError as error:
        parser.error(str(error))
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s:g}: must be > 0")
    out = args.out.resolve()
    steps = plan(parts, args.device, args.budget_s, out, args.meshes.resolve())
    print(format_plan(steps, args.device, args.budget_s), flush=True)
    env = part_env()
    box = probe(env)
    found = problems(steps, box, args.device, args.meshes)
    if found:
        print(f"gpu-bench: cannot start: {'; '.join(found)}", file=sys.stderr)
        return USAGE_ERROR
    if args.dry_run:
        print(f"gpu-bench: ready ({box.get('gpu') or 'CPU'}, torch {box['torch']}); --dry-run runs nothing")
        return 0
    return run_plan(steps, box, args, out, env)


def run_plan(steps: list[Step], box: dict, args: argparse.Namespace, out: Path, env: dict[str, str]) -> int:
    """Run every planned step in order, the summary rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(box=box, device=args.device, budget_s=args.budget_s,
                      started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), steps=steps)
    start = time.monotonic()
    for step in steps:
        if step.status == "skipped":
            continue
        print(f"gpu-bench: {step.name} (until {step.ends_at_s:.0f} s) ...", flush=True)
        (out / f"{step.name}.json").unlink(missing_ok=True)  # a result of an earlier run is no result
        run_step(step, env, out / f"{step.name}.log", start + step.ends_at_s)
        step.results = read_results(step, out)
        if step.name == "nvdiffrast" and step.status != "ok":  # the other numbers still come
            env["DREAMLOOM_RASTERIZER"] = "torch"
            step.note = "no plugin: the later parts use the PyTorch rasteriser"
        print(f"gpu-bench: {step.name} {step.status} in {step.seconds:.0f} s: {describe(step)}", flush=True)
        summary.seconds = round(time.monotonic() - start, 1)
        summary.targets = targets(steps)
        write_summary(summary, out)
    table = format_table(summary)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0 if all(step.status in ("ok", "skipped") for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())

"""gpu-bench's machinery on the CPU: the plan and its slots, a part stopped at its slot's end, the
bad-input line before any part, and a real run of parts through `build.py gpu-bench
--system-python --wheels` with `--device cpu` (the same commands the GPU box runs, at tiny sizes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend import gpu_bench
from backend.gpu_bench import PARTS, Step, plan, run_step

ROOT = Path(__file__).resolve().parents[2]


def build_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "build.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_the_slots_fill_the_budget_in_order(tmp_path: Path) -> None:
    assert sum(part.slot_s for part in PARTS) == gpu_bench.BUDGET_S
    steps = plan(PARTS, "cuda", 480.0, tmp_path, tmp_path)
    assert [s.name for s in steps][:2] == ["nvdiffrast", "cuda-tests"] and steps[-1].ends_at_s == pytest.approx(480.0)
    assert all(b.ends_at_s - a.ends_at_s == pytest.approx(b.slot_s) for a, b in zip(steps, steps[1:]))
    assert all(s.status == "planned" and s.command[0] == sys.executable for s in steps)
    # --only: the chosen parts share the whole budget, in their weights.
    half = plan(gpu_bench.select("guidance,pipeline"), "cuda", 90.0, tmp_path, tmp_path)
    assert [s.slot_s for s in half] == pytest.approx([90.0 * 55 / 180, 90.0 * 125 / 180])
    # On the CPU the CUDA-only parts are skipped, the rest run at tiny sizes.
    cpu = {s.name: s for s in plan(PARTS, "cpu", 480.0, tmp_path, tmp_path)}
    assert cpu["nvdiffrast"].status == cpu["raster-nvdiffrast"].status == "skipped"
    assert "--tiny" in cpu["guidance"].command and "cuda" not in cpu["pipeline"].command
    tests = cpu["cuda-tests"].command
    assert "tests/backend/test_raster.py" in tests and "tests/backend/test_hashgrid.py" in tests
    with pytest.raises(ValueError, match="no part nope"):
        gpu_bench.select("pipeline,nope")


def _step(code: str, slot_s: float) -> Step:
    return Step("probe", "a test process", [sys.executable, "-c", code], slot_s, slot_s)


def _ended(pid: int, within_s: float) -> bool:
    """True once the process is gone or a zombie (ended, waiting for init to reap it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
        if "\nState:\tZ" in status:
            return True
        time.sleep(0.05)
    return False


def test_a_part_out_of_time_is_stopped_at_its_slot_and_keeps_what_it_printed(tmp_path: Path) -> None:
    # It reports on SIGTERM (as the pipeline bench does), and its child goes with it.
    code = ("import signal, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child-pid', child.pid, flush=True)\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('had 3 steps', flush=True), sys.exit(3)))\n"
            "time.sleep(60)\n")
    step = _step(code, 3.0)
    started = time.monotonic()
    run_step(step, os.environ.copy(), tmp_path / "probe.log", started + step.slot_s)
    assert step.status == "stopped" and step.exit_code == 3
    assert step.seconds <= step.slot_s + 0.5
    log = (tmp_path / "probe.log").read_text()
    assert log.startswith("$ python -c") and "had 3 steps" in log
    child = int(log.split("child-pid ")[-1].split()[0])
    assert _ended(child, within_s=10.0)  # the whole process group was ended


def test_a_part_that_ignores_sigterm_is_killed_at_its_slot_end(tmp_path: Path) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n"
    step = _step(code, 2.5)
    started = time.monotonic()
    run_step(step, os.environ.copy(), tmp_path / "probe.log", started + step.slot_s)
    assert step.status == "stopped" and step.exit_code == -signal.SIGKILL
    assert step.seconds <= step.slot_s + 0.5


def test_a_part_that_ends_in_time_reports_its_exit(tmp_path: Path) -> None:
    step = _step("import sys; print('{\"x\": 1}'); sys.exit(4)", 30.0)
    run_step(step, os.environ.copy(), tmp_path / "probe.log", time.monotonic() + 30.0)
    assert step.status == "failed" and step.exit_code == 4 and step.seconds < 30.0
    assert gpu_bench.read_results(step, tmp_path) == [{"x": 1}]
    assert gpu_bench.describe(step) == 'exit 4: {"x": 1}'


def test_the_targets_read_the_standard_pipeline_and_the_guidance_bench() -> None:
    pipeline = Step("pipeline", "", [], 1.0, 1.0, status="ok", results={
        "quality": "standard", "extrapolated_total_s": 900.0, "peak_memory_gib": 21.0, "first_mesh_s": 40.0,
        "stages": [{"stage": stage, "ms_per_step": 120.0} for stage in ("coarse", "geometry", "texture")]})
    guidance = Step("guidance", "", [], 1.0, 1.0, status="ok", results={"hybrid_step_ms": 100.0})
    checks = gpu_bench.targets([pipeline, guidance])
    assert checks["total_min"] == {"value": 15.0, "target": 20.0, "met": True}
    assert checks["peak_gib"]["met"] is False  # 21 GiB is over 20 GB
    assert checks["first_mesh_s"]["met"] is True
    assert checks["step_ratio"]["value"] == pytest.approx(1.2) and checks["step_ratio"]["met"] is True
    pipeline.results["stages"] = pipeline.results["stages"][:1]  # stopped in the coarse stage
    assert set(gpu_bench.targets([pipeline, guidance])) == {"first_mesh_s", "step_ratio"}
    pipeline.results["quality"] = "tiny"  # a CPU run is no standard run
    assert gpu_bench.targets([pipeline, guidance]) == {}


def test_no_cuda_in_torch_is_one_line_before_any_part(tmp_path: Path) -> None:
    result = build_py("gpu-bench", "--system-python", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "| 1 | nvdiffrast | 90 | 90 |" in result.stdout  # the plan comes first
    assert result.stderr.strip().splitlines() == [
        "gpu-bench: cannot start: torch 2.13.0+cpu was built without CUDA (use the box's own PyTorch, or --device cpu)"]
    assert not (tmp_path / "out").exists()
    result = build_py("gpu-bench", "--system-python", "--device", "cpu", "--meshes", str(tmp_path), "--dry-run")
    assert result.returncode == 2 and result.stderr.strip() == f"gpu-bench: cannot start: --meshes {tmp_path}: no spot.obj there"


@pytest.mark.slow
def test_cpu_run_end_to_end_through_build_py(tmp_path: Path) -> None:
    """Three parts of different kinds (pytest outcomes, a JSON file, JSON lines) with the wheelhouse
    installed offline; the whole plan on the CPU is `--device cpu` without `--only`."""
    from tests.backend.test_system_python import PYTHON
    from backend import system_python

    wheels = ROOT / ".whl" / f"system-python-cp{PYTHON.replace('.', '')}"
    system_python.wheelhouse(wheels, PYTHON, "manylinux_2_28_x86_64")
    out = tmp_path / "gpu-bench"
    result = build_py("gpu-bench", "--system-python", "--wheels", str(wheels), "--device", "cpu",
                      "--only", "cuda-tests,hashgrid,dmtet", "--budget-s", "360", "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["box"]["torch"].startswith("2.")
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["cuda-tests", "hashgrid", "dmtet"]
    assert all(step["status"] == "ok" and step["seconds"] <= step["slot_s"] for step in steps.values())
    counts = steps["cuda-tests"]["results"]["counts"]
    assert counts.get("skipped", 0) >= 5 and "failed" not in counts  # every CUDA test skips here
    assert steps["hashgrid"]["results"]["torch"][0] > 0 and steps["hashgrid"]["results"]["triton"].startswith("unavailable")
    assert steps["dmtet"]["results"][0]["resolution"] == 16 and steps["dmtet"]["results"][0]["mesh_faces"] > 0
    assert (out / "table.md").read_text().strip() in result.stdout
    assert {"cuda-tests.log", "hashgrid.log", "dmtet.log", "hashgrid.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_the_pipeline_bench_reports_what_it_had_when_its_slot_ends(tmp_path: Path) -> None:
    """SIGTERM once the coarse stage runs: the stage so far is closed, extrapolated and written."""
    report_path = tmp_path / "pipeline.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.pipeline_bench", "--device", "cpu", "--models", "tiny",
         "--steps", "coarse=400,geometry=1,texture=1", "--texture-size", "256", "--json", str(report_path)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the running log: "[   4.1 s] stage coarse (400 steps)"
        if "stage coarse" in line:
            break
    time.sleep(3.0)  # a few coarse steps (none, on a busy machine)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 3, stdout
    report = json.loads(report_path.read_text())
    assert report["stopped"].startswith("SIGTERM in coarse step ")
    (coarse,) = report["stages"]
    assert coarse["steps"] == 400 and coarse["steps_done"] < 400 and coarse["full_steps"] == 12
    # At the tiny preset's 12 steps: the seconds so far plus the mean step for each step not run.
    missing = max(0, 12 - coarse["steps_done"]) * coarse["ms_per_step"] / 1000
    assert coarse["extrapolated_s"] == pytest.approx(coarse["seconds"] + missing)
    assert report["extrapolated_total_s"] == pytest.approx(report["total_s"] + missing)
    assert "stopped: SIGTERM in coarse step" in stdout


def test_the_full_size_bench_job_overrides_take_what_the_pipeline_passes() -> None:
    """The full-size models run only on CUDA; their Job's overrides must keep the pipeline's
    signatures (the texture stage passes `prior=`), or the bench breaks where no CPU test looks."""
    import inspect

    from backend.pipeline import Job
    from backend.pipeline_bench import bench_job_class

    bench_job = bench_job_class("full")
    overrides = [name for name, value in vars(bench_job).items() if callable(value) and hasattr(Job, name)]
    assert overrides
    for name in overrides:
        assert inspect.signature(getattr(bench_job, name)) == inspect.signature(getattr(Job, name)), name

#!/usr/bin/env python3
"""Dreamloom's one entry point for setting up, testing and running the project.

    python build.py setup            create .venv and install the pinned dependencies
    python build.py test [ARGS]      set up, then run the whole test suite (ARGS go to pytest)
    python build.py serve [FLAGS]    set up, then start the backend (FLAGS go to `backend serve`)
    python build.py gpu-bench        on a CUDA machine: the GPU tests and every GPU benchmark,
                                     logs and JSON in out/gpu-bench/ (numbers for docs/benchmarks.md)
    python build.py addon            build the Blender extension: dist/dreamloom-<version>.zip
    python build.py demo [--models oracle|tiny|default]
                                     set up, build the extension, install it into the bpy module,
                                     generate from a sample prompt and image with a local backend,
                                     write out/demo.blend, out/demo.glb and out/demo.png

Needs nothing but Python 3.11 or newer. Every dependency version is pinned in pyproject.toml;
the installed set is remembered in .venv so a second run installs nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".dreamloom-installed"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def pinned_requirements() -> list[str]:
    """The pinned requirements this machine needs, read from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = list(project["dependencies"]) + extras["test"] + extras["blender"]
    requirements += extras["gpu"] if has_nvidia_gpu() else extras["cpu"]
    return requirements


def setup() -> Path:
    """Create .venv and install the pinned requirements unless they are installed already."""
    requirements = pinned_requirements()
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    python = venv_python()
    if python.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return python
    if not python.exists():
        print(f"build.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print(f"build.py: installing {len(requirements)} pinned packages into {VENV}", flush=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
        check=True,
    )
    STAMP.write_text(digest)
    return python


def run(python: Path, args: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(python), *args], cwd=ROOT, env=env).returncode


ADDON_SOURCE = ROOT / "blender_addon"
ADDON_WHEELS = ("pyzmq==27.3.0", "msgpack==1.2.4")
"""Compiled dependencies the extension bundles for Blender's Python (3.11 in Blender 4.2 to 5.0)."""
WHEEL_PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_9_x86_64"),
}
"""Blender platform -> pip platform tags to download wheels for (newest first)."""
WHEEL_CACHE = ROOT / ".whl"
ADDON_EXCLUDE = ("__pycache__", "*.pyc", "tools")
"""Source-tree entries that stay out of the extension (tools/ holds the demo driver)."""


def download_addon_wheels(python: Path) -> list[Path]:
    """pyzmq and msgpack wheels for cp311 on every platform, cached in .whl/<platform>/."""
    wheels: list[Path] = []
    for platform, tags in WHEEL_PLATFORMS.items():
        folder = WHEEL_CACHE / platform
        found = sorted(folder.glob("*.whl")) if folder.is_dir() else []
        if len(found) < len(ADDON_WHEELS):
            platform_flags = [flag for tag in tags for flag in ("--platform", tag)]
            print(f"build.py: downloading {', '.join(ADDON_WHEELS)} wheels for {platform}", flush=True)
            subprocess.run(
                [str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q",
                 "--only-binary=:all:", "--no-deps", "--python-version", "3.11", "--implementation", "cp",
                 *platform_flags, "-d", str(folder), *ADDON_WHEELS],
                check=True,
            )
            found = sorted(folder.glob("*.whl"))
        wheels += found
    return wheels


def build_addon(python: Path) -> Path:
    """Stage blender_addon + a copy of protocol/ + wheels in build/addon, zip to dist/."""
    manifest_text = (ADDON_SOURCE / "blender_manifest.toml").read_text()
    version = tomllib.loads(manifest_text)["version"]
    wheels = download_addon_wheels(python)
    # 1. Stage the package: add-on modules, the vendored protocol, the wheels.
    stage = ROOT / "build" / "addon" / "dreamloom"
    shutil.rmtree(stage.parent, ignore_errors=True)
    ignore = shutil.ignore_patterns(*ADDON_EXCLUDE)
    shutil.copytree(ADDON_SOURCE, stage, ignore=ignore)
    shutil.copytree(ROOT / "protocol", stage / "protocol", ignore=ignore)
    (stage / "wheels").mkdir()
    unique = {w.name: w for w in wheels}  # universal2 wheels serve both macOS platforms
    for wheel in unique.values():
        shutil.copy2(wheel, stage / "wheels" / wheel.name)
    listed = ",\n".join(f'    "./wheels/{name}"' for name in sorted(unique))
    manifest = manifest_text.replace("wheels = []", f"wheels = [\n{listed},\n]")
    if manifest == manifest_text:
        raise SystemExit("build.py: blender_manifest.toml has no `wheels = []` line to fill in")
    (stage / "blender_manifest.toml").write_text(manifest)
    # 2. Zip with the manifest at the root, as Blender's `extension build` does.
    out = ROOT / "dist" / f"dreamloom-{version}.zip"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(stage).as_posix())
    print(f"build.py: wrote {out.relative_to(ROOT)} ({out.stat().st_size / 2**20:.1f} MiB, "
          f"{len(unique)} wheels)", flush=True)
    return out


def demo(python: Path, args: list[str]) -> int:
    """Build the extension, then run the headless demo (blender_addon/tools/demo.py) on it."""
    archive = build_addon(python)
    return run(python, [str(ADDON_SOURCE / "tools" / "demo.py"), "--zip", str(archive),
                        "--out", str(ROOT / "out"), "--python", str(python), *args])


MESHES = ROOT.parent / "shared" / "meshes"
GPU_BENCH = (
    ("cuda-tests", ["-m", "pytest", "-q", "-ra", "-m", "cuda", "tests"]),
    ("hashgrid", ["-m", "backend.hashgrid", "--bench", "--device", "cuda", "--points", "262144"]),
    ("neus", ["-m", "backend.neus", "--bench", "--device", "cuda", "--rays", "4096", "--samples", "64"]),
    ("raster-nvdiffrast", ["-m", "backend.raster", "bench", "--device", "cuda", "--kind", "nvdiffrast"]),
    ("raster-torch", ["-m", "backend.raster", "bench", "--device", "cuda", "--kind", "torch"]),
    ("dmtet", ["-m", "backend.dmtet", "bench", "--device", "cuda", "64", "128", "256"]),
    ("guidance", ["-m", "backend.guidance.bench", "--device", "cuda"]),
    ("reconstruct-spot", ["-m", "backend.bench", "reconstruct", "--mesh", str(MESHES / "spot.obj"),
                          "--texture", str(MESHES / "spot_texture.png"), "--device", "cuda",
                          "--quality", "standard", "--out", "out/gpu-bench/spot"]),
    ("reconstruct-bunny", ["-m", "backend.bench", "reconstruct", "--mesh", str(MESHES / "stanford-bunny.obj"),
                           "--device", "cuda", "--quality", "standard", "--out", "out/gpu-bench/bunny"]),
    ("reconstruct-teapot", ["-m", "backend.bench", "reconstruct", "--mesh", str(MESHES / "teapot.obj"),
                            "--device", "cuda", "--quality", "standard", "--out", "out/gpu-bench/teapot"]),
    ("pipeline", ["-m", "backend.pipeline_bench", "--device", "cuda", "--quality", "standard",
                  "--json", "out/gpu-bench/pipeline.json"]),
)
"""The GPU checks and benchmarks whose numbers docs/benchmarks.md records, in order."""


def gpu_bench(python: Path) -> int:
    """Run every entry of GPU_BENCH, each logged to out/gpu-bench/<name>.log; go on past failures."""
    out = ROOT / "out" / "gpu-bench"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args in GPU_BENCH:
        print(f"build.py: gpu-bench {name}: python {' '.join(args)}", flush=True)
        with (out / f"{name}.log").open("w") as log:
            code = subprocess.run([str(python), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
        last = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        print(f"    exit {code}: {last[0][:300]}", flush=True)
        if code != 0:
            failed.append(name)
    print(f"build.py: gpu-bench wrote {out.relative_to(ROOT)}/; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    commands = ("setup", "test", "serve", "addon", "demo", "gpu-bench")
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    if command == "gpu-bench" and not has_nvidia_gpu():
        print("build.py: gpu-bench needs an NVIDIA GPU (nvidia-smi not found)", file=sys.stderr)
        return 2
    python = setup()
    if command == "setup":
        return 0
    if command == "test":
        return run(python, ["-m", "pytest", "-q", "-ra", *rest])
    if command == "serve":
        return run(python, ["-m", "backend", "serve", *rest])
    if command == "addon":
        build_addon(python)
        return 0
    if command == "demo":
        return demo(python, rest)
    if command == "gpu-bench":
        return gpu_bench(python)
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

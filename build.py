#!/usr/bin/env python3
"""Dreamloom's one entry point for setting up, testing and running the project.

    python build.py setup            create .venv and install the pinned dependencies
    python build.py test [ARGS]      set up, then run the whole test suite (ARGS go to pytest)
    python build.py serve [FLAGS]    set up, then start the backend (FLAGS go to `backend serve`)
    python build.py gpu-bench [FLAGS]
                                     on a CUDA machine: the GPU tests and the GPU benchmarks in one
                                     time budget (--budget-s 480), logs and summary.json in
                                     out/gpu-bench/; --dry-run prints the plan (docs/benchmarks.md)
    python build.py serve|gpu-bench --system-python [--wheels DIR] [FLAGS]
                                     the same on this interpreter's own PyTorch, offline: DIR's
                                     wheels go into a folder of their own (docs/server.md)
    python build.py wheelhouse [--python 3.12] [--platform manylinux_2_28_x86_64] --to DIR
                                     where PyPI is reachable: the pinned wheels a PyTorch box lacks
    python build.py addon            build the Blender extension: dist/dreamloom-<version>.zip
    python build.py demo [--models tiny|default]
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


def system_python_args(module: list[str], rest: list[str]) -> list[str]:
    """`--system-python [--wheels DIR]`: run `python -m MODULE REST` on the interpreter build.py
    runs on, with its own packages, no venv and no registry (backend/system_python.py installs
    DIR's wheels into a folder of their own and checks the versions first)."""
    rest = [arg for arg in rest if arg != "--system-python"]
    wheels: list[str] = []
    if "--wheels" in rest:
        at = rest.index("--wheels")
        wheels, rest = rest[at:at + 2], rest[:at] + rest[at + 2:]
    return ["-m", "backend.system_python", "run", *wheels, "--", *module, *rest]


def main(argv: list[str]) -> int:
    commands = ("setup", "test", "serve", "addon", "demo", "gpu-bench", "wheelhouse")
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    modules = {"serve": ["-m", "backend", "serve"], "gpu-bench": ["-m", "backend.gpu_bench"]}
    if command == "wheelhouse":
        return run(Path(sys.executable), ["-m", "backend.system_python", "wheelhouse", *rest])
    if command in modules and "--system-python" in rest:
        return run(Path(sys.executable), system_python_args(modules[command], rest))
    python = setup()
    if command == "setup":
        return 0
    if command == "test":
        return run(python, ["-m", "pytest", "-q", "-ra", *rest])
    if command in modules:
        return run(python, modules[command] + rest)
    if command == "addon":
        build_addon(python)
        return 0
    if command == "demo":
        return demo(python, rest)
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

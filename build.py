#!/usr/bin/env python3
"""Dreamloom's one entry point for setting up, testing and running the project.

    python build.py setup            create .venv and install the pinned dependencies
    python build.py test [ARGS]      set up (also .venv-bpy52: bpy 5.2.3 on Python 3.13, for the
                                     add-on's tests), then run the whole test suite (ARGS go to pytest)
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
    python build.py demo [--models oracle|tiny|default]
                                     set up, build the extension, install it into the bpy module,
                                     generate from a sample prompt and image with a local backend,
                                     write out/demo.blend, out/demo.glb and out/demo.png

Needs nothing but Python 3.11 or newer. Every dependency version is pinned in pyproject.toml;
the installed set is remembered in .venv so a second run installs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BPY_PY313_VENV = ROOT / ".venv-bpy52"
"""The add-on tests' second Blender: bpy 5.2.3 on Python 3.13 and nothing else (the add-on
brings its own pyzmq and msgpack wheels; a LOCAL backend runs from .venv)."""


def venv_python(folder: Path = VENV) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def pinned_requirements() -> list[str]:
    """The pinned requirements this machine needs, read from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The test suite runs `serve --ray` on a local Ray, so .venv has the `ray` extra too.
    requirements = list(project["dependencies"]) + extras["test"] + extras["ray"] + extras["blender"]
    requirements += extras["gpu"] if has_nvidia_gpu() else extras["cpu"]
    return requirements


def ensure_venv(folder: Path, base_python: Path, requirements: list[str]) -> Path:
    """Create the virtual environment `folder` from `base_python` and install the pinned
    requirements, unless they are installed already (a stamp file remembers them)."""
    stamp = folder / ".dreamloom-installed"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    python = venv_python(folder)
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    if not python.exists():
        print(f"build.py: creating {folder}", flush=True)
        subprocess.run([str(base_python), "-m", "venv", "--clear", str(folder)], check=True)
    print(f"build.py: installing {len(requirements)} pinned packages into {folder}", flush=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
        check=True,
    )
    stamp.write_text(digest)
    return python


def setup() -> Path:
    """Create .venv and install the pinned requirements unless they are installed already."""
    return ensure_venv(VENV, Path(sys.executable), pinned_requirements())


def find_python(version: str) -> Path | None:
    """An interpreter of this Python version ("3.13"): this one, pyenv's (`pyenv root`/versions/
    <version>.*, newest first) or python<version> on PATH; each is asked for its version, since a
    pyenv shim on PATH may belong to no selected version."""
    candidates = [Path(sys.executable)]
    pyenv_root = os.environ.get("PYENV_ROOT")
    if not pyenv_root and shutil.which("pyenv"):
        pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    if pyenv_root:
        installed = Path(pyenv_root).glob(f"versions/{version}.*/bin/python{version}")
        candidates += sorted(installed, key=lambda p: [int(x) for x in p.parents[1].name.split(".") if x.isdigit()],
                             reverse=True)
    if on_path := shutil.which(f"python{version}"):
        candidates.append(Path(on_path))
    check = f"import sys; sys.exit(sys.version_info[:2] != ({version.replace('.', ', ')}))"
    for candidate in candidates:
        if subprocess.run([str(candidate), "-c", check], capture_output=True).returncode == 0:
            return candidate
    return None


def setup_bpy_py313() -> Path | None:
    """Create .venv-bpy52 (bpy 5.2.3) from a Python 3.13, or say in one line why not."""
    base = find_python("3.13")
    if base is None:
        print("build.py: no Python 3.13 found (pyenv root/versions, python3.13 on PATH): "
              "the add-on tests skip bpy 5.2.3", flush=True)
        return None
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return ensure_venv(BPY_PY313_VENV, base, extras["blender-py313"])


def run(python: Path, args: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(python), *args], cwd=ROOT, env=env).returncode


ADDON_SOURCE = ROOT / "blender_addon"
ADDON_WHEELS = ("pyzmq==27.3.0", "msgpack==1.2.4")
"""Compiled dependencies the extension bundles, for every Python in the add-on's PYTHONS."""


class WheelPlatform(NamedTuple):
    """A Blender platform: the pip platform tags to download for, and which wheel platform tags
    Blender installs there (its rule, bl_pkg's `_extensions_wheel_filter_for_this_system`: a tag
    that starts with `tag_prefix` and ends with one of `tag_suffixes`)."""

    pip_tags: tuple[str, ...]
    tag_prefix: str
    tag_suffixes: tuple[str, ...]


WHEEL_PLATFORMS = {
    "linux-x64": WheelPlatform(("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
                               "manylinux", ("_x86_64",)),
    "windows-x64": WheelPlatform(("win_amd64",), "win", ("_amd64",)),
    "macos-arm64": WheelPlatform(("macosx_11_0_arm64",), "macosx_", ("_arm64", "_universal2")),
    "macos-x64": WheelPlatform(("macosx_10_15_x86_64", "macosx_10_9_x86_64"), "macosx_", ("_x86_64", "_universal2")),
}
"""The manifest's platforms, newest pip tags first."""
WHEEL_CACHE = ROOT / ".whl"
ADDON_EXCLUDE = ("__pycache__", "*.pyc", "tools")
"""Source-tree entries that stay out of the extension (tools/ holds the demo driver)."""


def addon_pythons(source: Path = ADDON_SOURCE) -> tuple[str, ...]:
    """The add-on's PYTHONS ("3.11", "3.13"); its __init__.py imports nothing at module level."""
    spec = importlib.util.spec_from_file_location("dreamloom_addon_init", source / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PYTHONS


def wheel_fits(wheel: str, requirement: str, platform: WheelPlatform, python_version: str) -> bool:
    """Whether Blender on `platform` with this Python ("3.13") installs `wheel` (a file name) for
    `requirement` ("msgpack==1.2.4"): the same project and version, a cpXY tag of this Python or a
    stable-ABI (abi3) one of an older Python, and a platform tag of that platform."""
    parts = wheel.removesuffix(".whl").split("-")  # name-version[-build]-python-abi-platform
    name, version, (python_tag, abi_tag, platform_tag) = parts[0], parts[1], parts[-3:]
    if [name.lower(), version] != requirement.lower().replace("-", "_").split("=="):
        return False
    minor = int(python_version.split(".")[1])
    cp_minors = [int(tag[3:]) for tag in python_tag.split(".") if tag.startswith("cp3")]
    if not any(m == minor or (abi_tag == "abi3" and m < minor) for m in cp_minors):
        return False
    return any(tag.startswith(platform.tag_prefix) and tag.endswith(platform.tag_suffixes)
               for tag in platform_tag.split("."))


def cached_wheels(folder: Path, requirement: str, platform: WheelPlatform, python_version: str) -> list[Path]:
    """The wheels in `folder` that Blender installs for `requirement` on that platform and Python."""
    return [w for w in sorted(folder.glob("*.whl")) if wheel_fits(w.name, requirement, platform, python_version)]


def addon_wheels(python: Path, python_versions: tuple[str, ...], cache: Path = WHEEL_CACHE) -> list[Path]:
    """One wheel of each ADDON_WHEELS for every Python version on every platform, downloaded once
    into cache/<platform>/; one line naming the platform and Python where one cannot be had."""
    wheels: list[Path] = []
    for platform_name, platform in WHEEL_PLATFORMS.items():
        folder = cache / platform_name
        for python_version in python_versions:
            missing = [r for r in ADDON_WHEELS if not cached_wheels(folder, r, platform, python_version)]
            if missing:
                print(f"build.py: downloading {', '.join(missing)} for Python {python_version} on {platform_name}",
                      flush=True)
                platform_flags = [flag for tag in platform.pip_tags for flag in ("--platform", tag)]
                download = subprocess.run(
                    [str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q",
                     "--only-binary=:all:", "--no-deps", "--python-version", python_version, "--implementation", "cp",
                     *platform_flags, "-d", str(folder), *missing],
                    capture_output=True, text=True,
                )
                still_missing = [r for r in missing if not cached_wheels(folder, r, platform, python_version)]
                if still_missing:
                    reason = (download.stderr.strip().splitlines() or [f"exit status {download.returncode}"])[-1]
                    raise SystemExit(f"build.py: no {', '.join(still_missing)} wheel for Python {python_version} "
                                     f"on {platform_name} (pip download: {reason})")
            wheels += [cached_wheels(folder, r, platform, python_version)[-1] for r in ADDON_WHEELS]
    return wheels


def blender_validator(python: Path) -> Path:
    """Blender's own extension validator, blender_ext.py, inside `python`'s bpy module."""
    where = subprocess.run([str(python), "-c", "import importlib.util as u; s = u.find_spec('bpy'); "
                            "print(s.submodule_search_locations[0] if s else '')"], capture_output=True, text=True)
    found = sorted(Path(where.stdout.strip()).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")) \
        if where.stdout.strip() else []
    if not found:
        raise SystemExit(f"build.py: no Blender extension validator: {python} has no bpy module "
                         "(python build.py setup installs it)")
    return found[-1]


def validate_extension(python: Path, archive: Path) -> None:
    """Run Blender's strict validator on the zip; if it refuses, delete the zip and exit with the
    line that names the field."""
    check = subprocess.run([str(python), str(blender_validator(python)), "validate", str(archive)],
                           capture_output=True, text=True)
    if check.returncode != 0:
        archive.unlink()
        lines = (check.stdout + check.stderr).strip().splitlines() or [f"exit status {check.returncode}"]
        raise SystemExit(f"build.py: Blender refuses {archive.name}: {lines[-1].removeprefix('FATAL_ERROR: ')}")


def build_addon(python: Path, source: Path = ADDON_SOURCE, out: Path = ROOT) -> Path:
    """Stage the add-on + a copy of protocol/ + wheels in out/build/addon, zip it to
    out/dist/dreamloom-<version>.zip and check it with Blender's validator."""
    manifest_text = (source / "blender_manifest.toml").read_text()
    version = tomllib.loads(manifest_text)["version"]
    wheels = addon_wheels(python, addon_pythons(source))
    # 1. Stage the package: add-on modules, the vendored protocol, the wheels.
    stage = out / "build" / "addon" / "dreamloom"
    shutil.rmtree(stage.parent, ignore_errors=True)
    ignore = shutil.ignore_patterns(*ADDON_EXCLUDE)
    shutil.copytree(source, stage, ignore=ignore)
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
    # 2. Zip with the manifest at the root, as Blender's `extension build` does, and validate.
    archive = out / "dist" / f"dreamloom-{version}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(stage).as_posix())
    validate_extension(python, archive)
    print(f"build.py: wrote {archive.relative_to(out)} ({archive.stat().st_size / 2**20:.1f} MiB, "
          f"{len(unique)} wheels, accepted by Blender's validator)", flush=True)
    return archive


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
        setup_bpy_py313()
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

"""Run on an interpreter that already has PyTorch (an air-gapped GPU box), with no registry.

    python -m backend.system_python wheelhouse [--python 3.12] [--platform manylinux_2_28_x86_64] --to DIR
        where a registry is reachable: download the pinned wheels of `BROUGHT_PACKAGES` (the
        packages a PyTorch box lacks) for that Python and platform into DIR.
    python -m backend.system_python run [--wheels DIR] -- ARGS...
        on the box: install DIR's wheels into a folder of their own (`pip install --no-index
        --target`), check that this interpreter's own packages are versions the code works with
        (`SYSTEM_REQUIREMENTS`, and every brought wheel's own requirements), then replace this
        process with `python ARGS...`, that folder on PYTHONPATH.

`python build.py wheelhouse|serve|gpu-bench --system-python --wheels DIR` come here. A missing
wheel or a version that does not fit is one line on stderr and exit status 2, before anything
runs. Nothing here imports torch (the check reads installed metadata only).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE_ERROR = 2

BROUGHT_PACKAGES = (
    "diffusers", "importlib-metadata", "lazy-importer", "xatlas", "fast-simplification", "trimesh", "pyzmq",
    "msgpack", "platformdirs", "diffrp-nvdiffrast",
)
"""What the wheelhouse brings, at pyproject.toml's pins: the runtime packages a PyTorch box lacks
(importlib-metadata and lazy-importer are diffusers' own requirements; msgpack is brought though
such boxes often have it, so its version is the pinned one). Together well under 20 MB."""

SYSTEM_REQUIREMENTS = (
    "torch>=2.11", "numpy>=1.26,<3", "pillow>=10", "transformers>=5.0,<6", "tokenizers>=0.21",
    "huggingface-hub>=1.32,<3", "safetensors>=0.8", "accelerate>=1.0", "peft>=0.17", "tqdm>=4.66",
)
"""What the code takes from the interpreter, and the versions it works with: pyproject.toml's pins
are what the CPU suite runs; the lower bounds are the oldest releases the code is meant for (the
GPU box's own, e.g. torch 2.11 and transformers 5.17)."""

SITE_FOLDER = ROOT / "build" / "system-python"
"""Where `run` installs the brought wheels, one subfolder per Python version."""


class SystemPythonError(Exception):
    """Bad input or an unfit interpreter; the message is one line that says which."""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Importlib_Metadata` -> `importlib-metadata`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements() -> dict[str, str]:
    """Canonical name -> `name==version` of every pin in pyproject.toml (extras included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins += extra
    return {canonical(pin.split("==")[0]): pin for pin in pins}


def brought_requirements() -> list[str]:
    """`name==version` of each of `BROUGHT_PACKAGES`, from pyproject.toml."""
    pins = pinned_requirements()
    unpinned = [name for name in BROUGHT_PACKAGES if name not in pins]
    if unpinned:
        raise SystemPythonError(f"pyproject.toml pins no version of {', '.join(unpinned)}")
    return [pins[name] for name in BROUGHT_PACKAGES]


# 1. The wheelhouse (where a registry is reachable) -------------------------------------------------


def platform_tags(platform: str) -> list[str]:
    """pip matches manylinux tags exactly: `manylinux_2_28_x86_64` -> itself and every older
    manylinux tag a glibc-2.28 box also runs (2_27 ... 2_17, manylinux2014, 2010, 1)."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if match is None:
        return [platform]
    newest, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]
    return tags + [f"manylinux{alias}_{arch}" for alias in ("2014", "2010", "1")]


def wheelhouse(to: Path, python_version: str, platform: str) -> list[Path]:
    """Download the brought wheels for `python_version` on `platform` into `to`; the wheel files."""
    from packaging.tags import compatible_tags, cpython_tags

    if not re.fullmatch(r"3\.\d+", python_version):
        raise SystemPythonError(f"--python {python_version}: expected a version like 3.12")
    requirements = brought_requirements()
    to.mkdir(parents=True, exist_ok=True)
    platforms = platform_tags(platform)
    version = tuple(int(part) for part in python_version.split("."))
    tags = {*cpython_tags(version, platforms=platforms), *compatible_tags(version, platforms=platforms)}
    try:  # all there already (a second run downloads nothing)
        wheels = [wheel_for(to, requirement, tags, python_version) for requirement in requirements]
    except SystemPythonError:
        print(f"wheelhouse: {len(requirements)} wheels for Python {python_version} on {platform} into {to}",
              flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
             "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
             *[flag for tag in platforms for flag in ("--platform", tag)], "-d", str(to), *requirements],
            check=True,
        )
        wheels = [wheel_for(to, requirement, tags, python_version) for requirement in requirements]
    for wheel in wheels:
        print(f"  {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MiB)")
    total = sum(wheel.stat().st_size for wheel in wheels)
    print(f"wheelhouse: {total / 2**20:.1f} MiB in {len(wheels)} wheels", flush=True)
    return wheels


def wheel_for(folder: Path, requirement: str, tags: set, python_version: str) -> Path:
    """The wheel of `name==version` in `folder` whose tags meet `tags`; a missing one is a
    `SystemPythonError` that says how to make it."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    name, version = requirement.split("==")
    for wheel in sorted(folder.glob("*.whl")):
        try:
            wheel_name, wheel_version, _, wheel_tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if canonical(wheel_name) == canonical(name) and str(wheel_version) == version and wheel_tags & tags:
            return wheel
    raise SystemPythonError(
        f"--wheels {folder}: no wheel of {requirement} for Python {python_version} on this "
        f"platform; make the wheelhouse with `python build.py wheelhouse --python {python_version} "
        f"--to {folder}` where PyPI is reachable"
    )


# 2. Install and check (on the box) -----------------------------------------------------------------


def install(wheels: Path, site: Path) -> Path:
    """Install the brought wheels from `wheels` into `site` offline (once: a stamp remembers them)."""
    if not wheels.is_dir():
        raise SystemPythonError(f"--wheels {wheels}: not a folder")
    from packaging.tags import sys_tags

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    tags = set(sys_tags())
    files = [wheel_for(wheels, requirement, tags, python) for requirement in brought_requirements()]
    stamp = site / ".dreamloom-wheels"
    listing = "\n".join(f"{wheel.name} {wheel.stat().st_size}" for wheel in files)
    if stamp.exists() and stamp.read_text() == listing:
        return site
    print(f"system-python: installing {len(files)} wheels from {wheels} into {site}", file=sys.stderr, flush=True)
    shutil.rmtree(site, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-index",
         "--no-deps", "--target", str(site), *map(str, files)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemPythonError(f"pip install --no-index --target {site} failed: {last}")
    stamp.write_text(listing)
    return site


def unfit_requirements(requirements: list[str] | tuple[str, ...], path: list[str]) -> list[str]:
    """The requirements the distributions on `path` do not meet, each as `what (has what)`."""
    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        requirement = Requirement(text)
        found = next(importlib.metadata.distributions(name=requirement.name, path=path), None)
        if found is None:
            problems.append(f"{requirement} (not installed)")
        elif not requirement.specifier.contains(found.version, prereleases=True):
            problems.append(f"{requirement} (has {found.version})")
    return problems


def wheel_dependencies(site: Path) -> list[str]:
    """What the distributions installed in `site` declare they need here (extras left out)."""
    from packaging.requirements import Requirement

    needed = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed.append(f"{requirement.name}{requirement.specifier}")
    return needed


def require_packaging() -> None:
    """The wheel-tag and requirement parser everything here uses (pip's own is not importable)."""
    try:
        import packaging  # noqa: F401
    except ImportError:
        raise SystemPythonError(f"{sys.executable} has no `packaging`, which reading wheels and versions needs") from None


def check(site: Path | None, extra: tuple[str, ...] = ()) -> None:
    """Raise one line naming every requirement this interpreter (with `site` first) does not meet."""
    path = ([str(site)] if site is not None else []) + sys.path
    needed = list(SYSTEM_REQUIREMENTS) + list(extra) + (wheel_dependencies(site) if site is not None else [])
    problems = list(dict.fromkeys(unfit_requirements(needed, path)))
    if problems:
        raise SystemPythonError(f"{sys.executable} does not fit: needs {'; '.join(problems)}")


def site_for_this_python() -> Path:
    return SITE_FOLDER / f"cp{sys.version_info.major}{sys.version_info.minor}"


def prepare(wheels: Path | None) -> dict[str, str]:
    """Install (when `wheels` is given) and check; the environment the program runs in."""
    site = install(wheels, site_for_this_python()) if wheels is not None else None
    check(site)
    entries = [str(ROOT)] + ([str(site)] if site is not None else [])
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(entries))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.system_python", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    house = commands.add_parser("wheelhouse", help="download the wheels a PyTorch box lacks")
    house.add_argument("--python", default="3.12", help="the box's Python version (default 3.12)")
    house.add_argument("--platform", default="manylinux_2_28_x86_64",
                       help="the box's newest wheel platform tag (default manylinux_2_28_x86_64)")
    house.add_argument("--to", type=Path, required=True, help="the folder to fill")
    run = commands.add_parser("run", help="install the wheelhouse offline, check, run python ARGS")
    run.add_argument("--wheels", type=Path, help="a folder made by `wheelhouse` (none: check only)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments for python")
    args = parser.parse_args(argv)
    try:
        require_packaging()
        if args.command == "wheelhouse":
            wheelhouse(args.to, args.python, args.platform)
            return 0
        command = args.args[1:] if args.args[:1] == ["--"] else args.args
        if not command:
            raise SystemPythonError("run: nothing to run (expected `-- ARGS...` for python)")
        env = prepare(args.wheels)
    except (SystemPythonError, subprocess.CalledProcessError) as error:
        print(f"system-python: {error}", file=sys.stderr)
        return USAGE_ERROR
    os.execve(sys.executable, [sys.executable, *command], env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Dreamloom's one entry point for setting up, testing and running the project.

    python build.py setup            create .venv and install the pinned dependencies
    python build.py test [ARGS]      set up, then run the whole test suite (ARGS go to pytest)
    python build.py serve [FLAGS]    set up, then start the backend (FLAGS go to `backend serve`)

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
    if has_nvidia_gpu():
        requirements += extras["gpu"]
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


def main(argv: list[str]) -> int:
    commands = ("setup", "test", "serve")
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    python = setup()
    if command == "setup":
        return 0
    if command == "test":
        return run(python, ["-m", "pytest", "-q", "-ra", *rest])
    if command == "serve":
        return run(python, ["-m", "backend", "serve", *rest])
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

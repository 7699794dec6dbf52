"""The Blenders the add-on tests run in: the bpy module of each pinned version, in its own
environment. tests/addon/conftest.py runs every test that uses `addon_zip` once per Blender.

    bpy 5.0.1 (Python 3.11, as Blender 4.2 to 5.0): .venv, the interpreter pytest runs in
    bpy 5.2.3 (Python 3.13, as Blender 5.1 and later): .venv-bpy52, which `python build.py test`
        creates from a Python 3.13; without one those runs are skipped with the reason
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BPY_PYTHON_VARIABLE = "DREAMLOOM_BPY_PYTHON"
"""Set for a test's duration to the interpreter whose bpy runs its scenarios."""


def load_build():
    """build.py as a module (the functions `python build.py` runs)."""
    spec = importlib.util.spec_from_file_location("dreamloom_build", REPO / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


BUILD = load_build()


@dataclass(frozen=True)
class Blender:
    pin: str  # "bpy==5.2.3", from pyproject.toml
    python_version: str  # "3.13", the Python that bpy is built for
    venv: Path

    @property
    def label(self) -> str:
        return self.pin.replace("==", "-")

    def python(self) -> Path | str:
        """This Blender's interpreter, or why there is none (a line for the skip)."""
        if self.venv == BUILD.VENV:
            return Path(sys.executable)
        python = BUILD.venv_python(self.venv)
        if python.exists():
            return python
        if BUILD.find_python(self.python_version) is None:
            return (f"{self.pin}: no Python {self.python_version} on this machine "
                    f"(pyenv root/versions, python{self.python_version} on PATH)")
        return f"{self.pin}: no {self.venv.name} yet; `python build.py test` creates it"


_EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
BLENDERS = (Blender(_EXTRAS["blender"][0], "3.11", BUILD.VENV),
            Blender(_EXTRAS["blender-py313"][0], "3.13", BUILD.BPY_PY313_VENV))


def bpy_python() -> str:
    """The interpreter that runs this test's bpy scenarios (the pytest one outside a Blender run)."""
    return os.environ.get(BPY_PYTHON_VARIABLE, sys.executable)

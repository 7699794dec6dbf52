"""The offline install on an interpreter's own packages: a real wheelhouse from the registry
(cached in .whl/), `pip install --no-index --target`, and the version check on real metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend import system_python
from backend.system_python import SystemPythonError

ROOT = Path(__file__).resolve().parents[2]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The brought wheels for this Python, downloaded once (as `build.py addon` caches its own)."""
    folder = ROOT / ".whl" / f"system-python-cp{PYTHON.replace('.', '')}"
    system_python.wheelhouse(folder, PYTHON, "manylinux_2_28_x86_64")
    return folder


def run_module(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.system_python", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
                          capture_output=True, text=True, timeout=300)


def test_platform_tags_cover_every_older_manylinux() -> None:
    tags = system_python.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_26_x86_64" in tags  # pyzmq's tag
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert system_python.platform_tags("win_amd64") == ["win_amd64"]


def test_every_brought_package_is_pinned_in_pyproject() -> None:
    requirements = system_python.brought_requirements()
    assert [r.split("==")[0] for r in requirements] == [
        "diffusers", "importlib_metadata", "lazy-importer", "xatlas", "fast-simplification", "trimesh", "pyzmq",
        "msgpack", "platformdirs", "diffrp-nvdiffrast",
    ]


def test_the_wheelhouse_is_small_and_installs_offline(wheelhouse: Path, tmp_path: Path) -> None:
    wheels = sorted(wheelhouse.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) < 20e6
    site = system_python.install(wheelhouse, tmp_path / "site")
    for module in ("diffusers", "xatlas", "fast_simplification", "trimesh", "zmq", "msgpack", "platformdirs", "nvdiffrast"):
        assert any(site.glob(f"{module}*")), module  # a package folder or an extension module
    stamp = (site / ".dreamloom-wheels").read_text()
    assert system_python.install(wheelhouse, site) == site  # a second call installs nothing
    assert (site / ".dreamloom-wheels").read_text() == stamp
    # What the brought wheels themselves need, as their published metadata says.
    needed = system_python.wheel_dependencies(site)
    assert "zipp>=3.20" in needed and "numpy>=1.21" in needed
    assert any(n.startswith("huggingface-hub") and ">=1.32.0" in n for n in needed)
    system_python.check(site)  # this venv meets them all


def test_run_puts_the_folder_on_the_path_of_the_program(wheelhouse: Path, tmp_path: Path) -> None:
    result = run_module("run", "--wheels", str(wheelhouse), "--", "-c",
                        "import os, xatlas, zmq; print(xatlas.__file__); print(os.environ['PYTHONPATH'])")
    assert result.returncode == 0, result.stderr
    module_file, pythonpath = result.stdout.strip().splitlines()
    site = system_python.site_for_this_python()
    assert Path(module_file).is_relative_to(site)
    assert pythonpath.split(os.pathsep)[:2] == [str(ROOT), str(site)]


def test_a_missing_wheel_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    result = run_module("run", "--wheels", str(tmp_path / "wheels"), "--", "-c", "print('ran')")
    assert result.returncode == 2 and "ran" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no wheel of diffusers==0.42.1 for Python" in lines[0]
    assert "python build.py wheelhouse --python" in lines[0]
    result = run_module("run", "--wheels", str(tmp_path / "nowhere"), "--", "-c", "print('ran')")
    assert result.returncode == 2 and result.stderr.strip() == f"system-python: --wheels {tmp_path / 'nowhere'}: not a folder"


def test_versions_that_do_not_fit_are_named_with_what_is_there() -> None:
    import numpy

    problems = system_python.unfit_requirements(["numpy>=99", "no-such-package>=1", "pytest>=1"], sys.path)
    assert problems == [f"numpy>=99 (has {numpy.__version__})", "no-such-package>=1 (not installed)"]
    with pytest.raises(SystemPythonError, match=r"does not fit: needs numpy<1 \(has "):
        system_python.check(None, extra=("numpy<1",))


def test_build_py_passes_the_wheels_flag_to_the_installer() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreamloom_build", ROOT / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    args = build.system_python_args(["-m", "backend", "serve"],
                                    ["--bind", "tcp://*:5555", "--system-python", "--wheels", "W", "--verbose"])
    assert args == ["-m", "backend.system_python", "run", "--wheels", "W", "--", "-m", "backend", "serve",
                    "--bind", "tcp://*:5555", "--verbose"]

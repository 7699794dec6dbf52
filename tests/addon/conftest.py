"""Every test that uses `addon_zip` runs once in each Blender of tests/addon/blenders.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.addon.blenders import BLENDERS, BPY_PYTHON_VARIABLE, BUILD, Blender


@pytest.fixture(scope="session", params=BLENDERS, ids=lambda blender: blender.label)
def tested_blender(request) -> Blender:
    """One Blender of BLENDERS (a test that uses this or what depends on it runs in each)."""
    return request.param


@pytest.fixture(scope="session")
def blender_python(tested_blender: Blender) -> Path:
    """That Blender's interpreter; the test is skipped, with the reason, when it has none."""
    python = tested_blender.python()
    if isinstance(python, str):
        pytest.skip(python)
    return python


@pytest.fixture(scope="session")
def built_zip() -> Path:
    """The extension zip, built the way `python build.py addon` builds it (once per session)."""
    return BUILD.build_addon(Path(sys.executable))


@pytest.fixture
def addon_zip(built_zip: Path, blender_python: Path, monkeypatch) -> Path:
    """The extension zip; the test's bpy scenarios run in `blender_python`."""
    monkeypatch.setenv(BPY_PYTHON_VARIABLE, str(blender_python))
    return built_zip


def pytest_report_header(config) -> str:
    """One line at the top of the run: which Blenders the add-on tests run in, and why one is not."""
    runs = [python if isinstance(python := b.python(), str) else f"{b.pin} ({python})" for b in BLENDERS]
    return "add-on tests in: " + "; ".join(runs)

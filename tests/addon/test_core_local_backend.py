"""LOCAL mode settings (starting the real backend is covered end to end in test_blender.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blender_addon.core.local_backend import LocalBackendSettings, check_settings, serve_command
from blender_addon.core.session import SessionError

REPO = Path(__file__).resolve().parents[2]


def test_serve_command():
    settings = LocalBackendSettings(python=sys.executable, project_dir=str(REPO), address="tcp://127.0.0.1:5599",
                                    store_dir="/tmp/store", models="tiny", device="cpu")
    assert serve_command(settings)[1:] == ["-m", "backend", "serve", "--bind", "tcp://127.0.0.1:5599", "--store",
                                           "/tmp/store", "--models", "tiny", "--device", "cpu"]
    forced = LocalBackendSettings(python=sys.executable, project_dir=str(REPO), address="tcp://127.0.0.1:5599",
                                  store_dir="/tmp/store", models="tiny", device="cpu", preset="small")
    assert serve_command(forced)[-2:] == ["--preset", "small"]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"python": "/no/python"}, "backend_python"), ({"project_dir": "/tmp"}, "backend_project_dir"),
     ({"store_dir": " "}, "backend_store_dir")],
)
def test_bad_local_settings_name_the_preference(change: dict, field: str):
    values = dict(python=sys.executable, project_dir=str(REPO), address="tcp://127.0.0.1:5555", store_dir="/tmp/s")
    values.update(change)
    with pytest.raises(SessionError) as info:
        check_settings(LocalBackendSettings(**values))
    assert info.value.field == field and field in str(info.value)

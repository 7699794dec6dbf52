"""Starting and stopping the real backend as the add-on's LOCAL mode does."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from blender_addon.core.local_backend import LocalBackend, LocalBackendSettings, check_settings, serve_command
from blender_addon.core.session import ClientSession, ConnectionSettings, RequestDone, SessionError

REPO = Path(__file__).resolve().parents[2]


def free_address() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_local_backend_starts_answers_and_stops(tmp_path: Path):
    settings = LocalBackendSettings(python=sys.executable, project_dir=str(REPO), address=free_address(),
                                    store_dir=str(tmp_path / "store"), models="tiny", device="cpu")
    assert serve_command(settings)[1:] == ["-m", "backend", "serve", "--bind", settings.address, "--store",
                                           str(tmp_path / "store"), "--models", "tiny", "--device", "cpu"]
    backend = LocalBackend(settings, tmp_path / "logs" / "backend.log")
    backend.start()
    session = ClientSession(ConnectionSettings(address=settings.address))
    try:
        assert backend.running
        session.hello(timeout_s=120)  # the backend imports torch and loads the tiny models first
        deadline = time.monotonic() + 120
        while session.welcome is None and time.monotonic() < deadline:
            updates = session.poll()
            assert not [u for u in updates if not isinstance(u, RequestDone)], updates
            time.sleep(0.05)
        assert session.welcome is not None and session.welcome["device"].startswith("cpu")
        assert any("listening on" in line for line in backend.log_tail(50))
    finally:
        session.close()
        backend.stop(timeout_s=20)
    assert not backend.running and backend.exit_code is not None


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

"""Start and stop a backend on this computer (preferences: backend mode LOCAL).

The backend needs torch, so it runs in its own Python environment, outside Blender:
`PYTHON -m backend serve --bind ADDRESS --store STORE --models MODELS` started with
`subprocess.Popen` from the project folder (non-blocking), its output going to a log file the
panel shows. Stopping it frees the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .session import SessionError


@dataclass
class LocalBackendSettings:
    """How to run the local backend."""

    python: str
    """The Python executable of the environment that has the backend's dependencies (torch...)."""
    project_dir: str
    """The Dreamloom project folder (holding `backend/` and `protocol/`)."""
    address: str
    """The address to bind, e.g. tcp://127.0.0.1:5555."""
    store_dir: str
    """The job store folder (jobs survive restarts here)."""
    models: str = "default"
    """The `--models` preset: "default" (real weights) or "tiny" (random tiny models, for tests)."""
    device: str = "cuda"
    """The `--device` the pipeline runs on: "cuda" or "cpu"."""
    preset: str = ""
    """A `--preset` forced on every job (e.g. "small" for the oracle demo on a CPU); "" for none."""


def check_settings(settings: LocalBackendSettings) -> None:
    """Raise SessionError naming the preference that cannot work."""
    python = Path(settings.python).expanduser()
    if not settings.python.strip() or not python.is_file():
        raise SessionError("backend_python", f"backend_python {settings.python!r} is not a Python executable")
    project = Path(settings.project_dir).expanduser()
    if not (project / "backend" / "__main__.py").is_file():
        raise SessionError(
            "backend_project_dir",
            f"backend_project_dir {settings.project_dir!r} holds no backend/__main__.py",
        )
    if not settings.store_dir.strip():
        raise SessionError("backend_store_dir", "backend_store_dir is empty")


def serve_command(settings: LocalBackendSettings) -> list[str]:
    """The command line that starts the backend."""
    return [
        str(Path(settings.python).expanduser()),
        "-m", "backend", "serve",
        "--bind", settings.address,
        "--store", str(Path(settings.store_dir).expanduser()),
        "--models", settings.models,
        "--device", settings.device,
        *(["--preset", settings.preset] if settings.preset else []),
    ]


class LocalBackend:
    """One backend process started by the add-on."""

    def __init__(self, settings: LocalBackendSettings, log_path: Path) -> None:
        check_settings(settings)
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        """time.monotonic() of the last start."""

    def start(self) -> None:
        """Start the process (returns at once); its output goes to `log_path`."""
        if self.running:
            return
        Path(self.settings.store_dir).expanduser().mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        project = str(Path(self.settings.project_dir).expanduser())
        env = dict(os.environ, PYTHONPATH=project, PYTHONUNBUFFERED="1")
        for name in ("PYTHONHOME", "PYTHONNOUSERSITE"):  # Blender's own Python settings
            env.pop(name, None)
        with open(self.log_path, "ab") as log:
            creationflags = subprocess.CREATE_NEW_PROCESS_GROUP if sys.platform == "win32" else 0
            self.process = subprocess.Popen(
                serve_command(self.settings),
                cwd=project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                creationflags=creationflags,
            )
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process ended, else None."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the process (kill it if it does not end within `timeout_s`)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def log_tail(self, lines: int = 12) -> list[str]:
        """The last lines of the log ([] before the first start)."""
        if not self.log_path.is_file():
            return []
        with open(self.log_path, "rb") as log:
            log.seek(max(0, self.log_path.stat().st_size - 16384))
            text = log.read().decode("utf-8", errors="replace")
        return text.splitlines()[-lines:]

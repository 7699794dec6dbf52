"""The mesh-runner server in a child process, started from any Python: stdlib only, so a
Blender without the backend's packages (the add-on tests' bpy 5.2) can start one in an
environment that has them.

    start_server_process(store, log_path, *flags, bind=..., python=sys.executable) -> ServerProcess
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """A server in a child process (`python -m tests.backend.mesh_runner ...`)."""

    process: subprocess.Popen
    """The child."""
    address: str
    """The address it bound (read from its log)."""
    log_path: Path
    """Its stderr."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def start_server_process(
    store: Path, log_path: Path, *extra: str, bind: str = "tcp://127.0.0.1:*", timeout_s: float = 20.0,
    preexec_fn: Callable[[], None] | None = None, python: Path | str = sys.executable,
) -> ServerProcess:
    """Start the mesh-runner server in a child process of `python` (an environment with the
    backend's packages); wait until it logs its address. Give each start its own `log_path`;
    `preexec_fn` runs in the child before it starts (limits)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(python), "-m", "tests.backend.mesh_runner", "--bind", bind, "--store", str(store), *extra],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.findall(r"listening on (\S+)", text)
        if found:
            return ServerProcess(process, found[-1], log_path)
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{text}")
        time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"the server did not start within {timeout_s} s:\n{log_path.read_text()}")

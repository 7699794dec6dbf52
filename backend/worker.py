"""Run one long, uninterruptible library call (xatlas, the quadric simplifier) in a child process
that a cancel can stop.

A C++ library call cannot be interrupted from Python: a job waiting on it in its own thread would
ignore a cancel until the call returns, which for xatlas on a large surface is minutes. So
`call_stoppable` runs the function in a fresh `python -m backend.worker IN OUT` process, and while
it waits calls `check_cancelled` every `poll_s` seconds; when that raises, the child is killed
and the exception goes on up. Arguments and results travel as pickles in a private temporary
folder. The function's module must import quickly and must not import torch (the worker would
spend seconds starting): `backend.decimate` and `backend.uvatlas` are such modules.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05
"""Seconds between two cancel checks while the child runs."""
STDERR_TAIL_CHARS = 2000
"""How much of a crashed child's stderr goes into the error message."""


class WorkerCrashed(RuntimeError):
    """The child process died without a result (a crash inside the library, or killed)."""


def never_cancelled() -> None:
    """The default `check_cancelled`: nothing ever stops the call."""


def call_stoppable(function: str, kwargs: dict[str, Any],
                   check_cancelled: Callable[[], None] = never_cancelled,
                   poll_s: float = POLL_S) -> Any:
    """`module:function(**kwargs)` run in a child process; returns its result.

    An exception the function raises is raised here as it was; an exception `check_cancelled`
    raises stops the child (killed, within `poll_s` plus the time the kill takes) and is raised.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="dreamloom-worker-") as folder:
        request, reply, errors = (Path(folder) / name for name in ("in.pkl", "out.pkl", "stderr.txt"))
        request.write_bytes(pickle.dumps((function, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
        with errors.open("wb") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "backend.worker", str(request), str(reply)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                     env=env, start_new_session=True)  # Ctrl-C reaches the parent only
            try:
                while True:
                    try:
                        child.wait(timeout=poll_s)
                        break
                    except subprocess.TimeoutExpired:
                        check_cancelled()
            finally:
                if child.poll() is None:  # cancelled (or interrupted): stop the work now
                    child.kill()
                    child.wait()
        if not reply.exists():
            check_cancelled()  # a child killed from outside while the job was being cancelled
            tail = errors.read_text(errors="replace")[-STDERR_TAIL_CHARS:].strip()
            raise WorkerCrashed(f"{function} stopped with exit code {child.returncode} and no result"
                                + (f": {tail}" if tail else ""))
        ok, value = pickle.loads(reply.read_bytes())
    if not ok:
        raise value
    return value


def main(argv: list[str]) -> int:
    """The child: read (function, kwargs) from IN, write (ok, result or exception) to OUT."""
    request, reply = Path(argv[0]), Path(argv[1])
    function, kwargs = pickle.loads(request.read_bytes())
    module_name, _, name = function.partition(":")
    try:
        outcome = (True, getattr(importlib.import_module(module_name), name)(**kwargs))
    except Exception as exc:  # handed to the parent, which raises it
        outcome = (False, exc)
    try:
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: its type and text still do
        data = pickle.dumps((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
    partial = reply.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(reply)  # the parent sees a whole result or none
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

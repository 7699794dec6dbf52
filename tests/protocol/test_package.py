"""The package works when copied under another name (as in the Blender extension) and stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import numpy as np
import vendored_protocol as p
from vendored_protocol import codec, keys, messages, params, transport
frames = p.encode(p.Message("event", {"event": "mesh"}, {"positions": np.zeros((2, 3), np.float32)}, seq=1))
assert p.decode(frames).buffers["positions"].shape == (2, 3)
assert params.validate_submit("generate", {"prompt": "x"}, {}).prompt == "x"
heavy = sorted(m for m in ("torch", "bpy", "protocol") if m in sys.modules)
print("heavy:", heavy)
"""


def test_vendored_copy_imports_relatively_and_pulls_in_neither_torch_nor_bpy(tmp_path: Path) -> None:
    shutil.copytree(REPO / "protocol", tmp_path / "vendored_protocol", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"

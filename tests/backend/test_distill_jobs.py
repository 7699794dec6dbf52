"""A short generate job end to end per score-distillation method (tiny models, CPU): the 2D
prior's method comes from `--distill` and reaches the coarse and geometry stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.cli_generate import main
from backend.guidance import distill
from protocol.params import DISTILL_METHODS

TINY = ["--models", "tiny", "--device", "cpu", "--texture-size", "256", "--no-progress"]


@pytest.mark.parametrize("method", [m for m in DISTILL_METHODS if m != "sds"])  # sds: test_pipeline.py
def test_a_job_runs_with_each_method(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    original = distill.Distiller.loss_on

    def recording(self, *args, **kwargs):
        used.append(self.method)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(distill.Distiller, "loss_on", recording)
    out = tmp_path / method
    code = main(["generate", "--prompt", "a cat", "--distill", method, "--steps", "coarse=2,geometry=1,texture=0",
                 "--mesh-every", "10", "--out", str(out), *TINY])
    assert code == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert (events[-1]["event"], events[-1]["state"]) == ("state", "done")
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["coarse", "geometry", "texture"]
    assert used == [method] * 3, "one step of the method per coarse and geometry step"
    assert (out / "model.glb").stat().st_size > 0

"""The face budget in whole jobs (CPU, tiny models): the final mesh has the faces asked for, a
budget under the minimum is raised with a `note` event, `target_faces` is validated, and a cancel
after the geometry stage stops the job in the unwrap's worker (how fast: test_decimate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.cli_generate import LocalContext, build_parser, main, params_from_args
from backend.config import PRESETS, config_for_job
from backend.decimate import MIN_FACES
from backend.jobs import JobCancelled
from backend.pipeline import make_runner
from protocol.codec import ProtocolError
from protocol.params import params_to_dict, validate_submit

TINY = ["--models", "tiny", "--device", "cpu", "--texture-size", "256", "--no-progress"]
STEPS = ["--steps", "coarse=2,geometry=1,texture=1", "--mesh-every", "10"]


def read_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_the_final_mesh_has_the_faces_asked_for_and_a_low_budget_is_raised_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "low"
    assert main(["generate", "--prompt", "a cat", *STEPS, "--target-faces", "20", "--out", str(out), *TINY]) == 0
    events = read_events(out)
    geometry = [e for e in events if e["event"] == "mesh" and e["stage"] == "geometry"][-1]
    final = [e for e in events if e["event"] == "mesh" and e["final"]][0]
    notes = [e for e in events if e["event"] == "note" and e["stage"] == "texture"]
    assert geometry["face_count"] > MIN_FACES  # the DMTet surface had more than the budget
    assert 0.95 * MIN_FACES <= final["face_count"] <= MIN_FACES
    assert len(notes) == 1 and "below the 500" in notes[0]["text"]
    # The note comes before the texture stage starts, and the job ends done.
    stage_seqs = {e["stage"]: e["seq"] for e in events if e["event"] == "stage"}
    assert notes[0]["seq"] < stage_seqs["texture"]
    assert events[-1]["event"] == "state" and events[-1]["state"] == "done"


def test_target_faces_is_validated_and_defaults_by_quality() -> None:
    for bad in (-1, 2.5, "50000", True, 2**31):
        with pytest.raises(ProtocolError) as error:
            validate_submit("generate", {"prompt": "a cat", "target_faces": bad}, {})
        assert error.value.field == "params.target_faces", bad
        assert "params.target_faces must be" in str(error.value), bad
    params = validate_submit("generate", {"prompt": "a cat", "target_faces": 0}, {})
    assert params.target_faces == 0 and validate_submit("generate", params_to_dict(params), {}) == params
    assert config_for_job(params).target_faces == 0
    default = validate_submit("generate", {"prompt": "a cat", "quality": "high"}, {})
    assert default.target_faces is None and "target_faces" not in params_to_dict(default)
    assert config_for_job(default).target_faces == PRESETS["high"].target_faces == 150_000
    assert PRESETS["draft"].target_faces == PRESETS["standard"].target_faces == 50_000
    # The CLI flag sets it and names itself when it is bad.
    args = build_parser().parse_args(["generate", "--prompt", "a cat", "--target-faces", "8000", "--out", "x"])
    assert params_from_args(args)["target_faces"] == 8000


def test_a_bad_target_faces_flag_exits_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["generate", "--prompt", "a cat", "--target-faces", "-5", "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert "--target-faces" in capsys.readouterr().err


class CancelAtTheGeometryEnd(LocalContext):
    """Asks for a cancel once the geometry stage streamed its last mesh: with the budget off, the
    next check is the unwrap's."""

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int:
        seq = super().emit(event, body, buffers)
        if event == "mesh" and body["stage"] == "geometry":
            self.request_cancel()
        return seq


def test_a_cancel_after_the_geometry_stage_stops_the_job_in_the_unwrap(tmp_path: Path) -> None:
    params = {"prompt": "a cat", "steps": {"coarse": 2, "geometry": 1, "texture": 1}, "mesh_every": 10,
              "target_faces": 0}
    ctx = CancelAtTheGeometryEnd(out_dir=tmp_path, kind="generate", params=validate_submit("generate", params, {}),
                                 inputs={}, show_progress=False)
    ctx.open("test")
    with pytest.raises(JobCancelled) as cancelled:
        make_runner("tiny", "cpu").run(ctx)
    # It was raised while the job waited on xatlas's worker process (killed then), not later.
    frames = [(Path(entry.path).name, entry.name) for entry in cancelled.traceback]
    assert ("texture.py", "unwrap") in frames and ("worker.py", "call_stoppable") in frames, frames
    stages = [e["stage"] for e in read_events(tmp_path) if e["event"] == "stage"]
    assert stages == ["coarse", "geometry"] and ctx.result_glb is None


def test_the_panel_settings_send_the_budget_for_generate_only() -> None:
    from blender_addon.core.settings import JobSettings, generate_params, refine_params

    settings = JobSettings(prompt="a cat", target_faces=8000)
    params = generate_params(settings)
    assert params["target_faces"] == 8000
    assert validate_submit("generate", params, {}).target_faces == 8000
    assert "target_faces" not in refine_params(settings)  # a refined mesh keeps its faces
    assert "target_faces" not in generate_params(JobSettings(prompt="a cat"))  # the quality's default

"""`backend.jobs.JobContext` on a real store: what a runner may emit and how it is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.jobs import JobCancelled, JobContext, JobHooks, JobInterrupted, RunnerError
from backend.store import JobStore
from protocol.params import validate_submit
from tests.backend.mesh_runner import MESHES_DIR, glb_bytes, load_obj


@pytest.fixture
def ctx_and_log(tmp_path: Path):
    store = JobStore(tmp_path)
    job, _ = store.create_job(owner="", kind="generate", prompt="cube", params={"prompt": "cube"}, inputs={})
    sent: list = []
    progress: list = []
    hooks = JobHooks(on_event=sent.append, on_progress=lambda *args: progress.append(args))
    ctx = JobContext(job_id=job.job_id, kind="generate", params=validate_submit("generate", {"prompt": "cube"}, {}),
                     inputs={}, resumed=False, store=store, hooks=hooks)
    return ctx, store, hooks, sent, progress


def test_mesh_events_are_stored_then_handed_on_with_counts_and_bbox(ctx_and_log) -> None:
    ctx, store, _, sent, _ = ctx_and_log
    verts_vx3, faces_fx3 = load_obj(MESHES_DIR / "suzanne.obj")
    assert ctx.emit("stage", {"stage": "coarse", "steps": 5}) == 2
    seq = ctx.emit("mesh", {"stage": "coarse", "step": 5, "final": True},
                   {"positions": verts_vx3.astype(np.float64), "faces": faces_fx3.astype(np.int64)})
    assert seq == 3 and ctx.final_mesh_emitted
    stored = store.events_after(ctx.job_id, 2)[0]
    assert (sent[-1].seq, sent[-1].body) == (stored.seq, stored.body)
    assert stored.body["vertex_count"] == len(verts_vx3) and stored.body["face_count"] == len(faces_fx3)
    np.testing.assert_allclose(stored.body["bbox"], [verts_vx3.min(0), verts_vx3.max(0)])
    assert stored.buffers["positions"].dtype == np.float32 and stored.buffers["faces"].dtype == np.int32


@pytest.mark.parametrize(
    ("event", "body", "buffers", "message"),
    [
        ("state", {"state": "done"}, None, "event must be one of"),
        ("stage", {"stage": "sculpt", "steps": 3}, None, "'stage' must be one of .* got 'sculpt'"),
        ("stage", {"stage": "coarse", "steps": -1}, None, "'steps' must be an int >= 0, got -1"),
        ("mesh", {"stage": "coarse", "step": 1, "final": False}, {"positions": np.zeros((4, 2))},
         "'positions' must be an \\[N,3\\] array, got array of shape \\[4, 2\\]"),
        ("mesh", {"stage": "coarse", "step": 1}, {"positions": np.zeros((4, 3)), "faces": np.zeros((1, 3))},
         "needs body field 'final'"),
    ],
)
def test_wrong_events_are_refused_by_field(ctx_and_log, event, body, buffers, message) -> None:
    ctx, store, _, sent, _ = ctx_and_log
    with pytest.raises(RunnerError, match=message):
        ctx.emit(event, body, buffers)
    assert sent == [] and store.get_job(ctx.job_id).last_seq == 1


def test_result_must_be_glb(ctx_and_log) -> None:
    ctx, store, *_ = ctx_and_log
    with pytest.raises(RunnerError, match="GLB bytes starting with b'glTF', got b'\\\\x89PNG'"):
        ctx.set_result(b"\x89PNG....")
    assert not ctx.has_result
    glb = glb_bytes(*load_obj(MESHES_DIR / "suzanne.obj"))
    ctx.set_result(glb)
    assert ctx.has_result and store.load_result(ctx.job_id) == glb


def test_cancel_and_shutdown_raise_at_the_next_check(ctx_and_log) -> None:
    ctx, _, hooks, _, _ = ctx_and_log
    ctx.check_cancelled()
    hooks.cancel.set()
    with pytest.raises(JobCancelled) as raised:
        ctx.check_cancelled()
    assert not isinstance(raised.value, JobInterrupted)
    hooks.shutdown.set()
    with pytest.raises(JobInterrupted):
        ctx.check_cancelled()


def test_checkpoints_and_progress(ctx_and_log) -> None:
    ctx, _, _, _, progress = ctx_and_log
    assert ctx.load_checkpoint() is None
    ctx.save_checkpoint(b"one")
    ctx.save_checkpoint(b"two")
    assert ctx.load_checkpoint() == b"two"
    ctx.progress("coarse", 3, 10, eta_s=2, losses={"sds": np.float32(0.5)}, preview_png=b"png")
    (job_id, body, buffers), = progress
    assert job_id == ctx.job_id and buffers == {"preview": b"png"}
    assert body == {"stage": "coarse", "step": 3, "steps": 10, "eta_s": 2.0, "losses": {"sds": 0.5}}

"""The SQLite job store on real files: numbering, buffers, restarts, queue order, deletion."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from backend.store import JobStore, StoreError

PARAMS = {"prompt": "a cup", "seed": 3}


def new_job(store: JobStore, owner: str = "", prompt: str = "a cup", **kwargs):
    created = store.create_job(owner=owner, kind="generate", prompt=prompt, params=PARAMS, inputs={}, **kwargs)
    assert created is not None
    return created


def test_first_event_is_queued_with_position(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first, queued = new_job(store)
    second, queued2 = new_job(store)
    assert (queued.seq, queued.body) == (1, {"event": "state", "state": "queued", "position": 0})
    assert queued2.body["position"] == 1
    assert first.state == "queued" and first.last_seq == 1 and first.params == PARAMS
    assert [j.job_id for j in store.list_jobs()] == [first.job_id, second.job_id]


def test_events_number_without_gaps_and_keep_their_buffers(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, _ = new_job(store)
    positions = np.arange(12, dtype=np.float32).reshape(4, 3)
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=">i4")  # big-endian in, little-endian stored
    colors = np.full((4, 3), 200, dtype=np.uint8)
    stage = store.append_event(job.job_id, {"event": "stage", "stage": "coarse", "steps": 10})
    mesh = store.append_event(
        job.job_id, {"event": "mesh", "stage": "coarse", "step": 5, "final": False},
        {"positions": positions, "faces": faces, "colors": colors, "texture": b"\x89PNG fake"},
    )
    assert (stage.seq, mesh.seq) == (2, 3)
    (loaded,) = store.events_after(job.job_id, 2)
    assert list(loaded.buffers) == ["positions", "faces", "colors", "texture"]
    np.testing.assert_array_equal(loaded.buffers["positions"], positions)
    assert loaded.buffers["faces"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(loaded.buffers["faces"], faces.astype("<i4"))
    np.testing.assert_array_equal(loaded.buffers["colors"], colors)
    assert loaded.buffers["texture"] == b"\x89PNG fake"
    record = store.get_job(job.job_id)
    assert (record.stage, record.step, record.steps, record.last_seq) == ("coarse", 5, 10, 3)
    assert [e.seq for e in store.events_after(job.job_id, 0)] == [1, 2, 3]
    assert [e.seq for e in store.events_after(job.job_id, 1, up_to_seq=2)] == [2]


def test_bad_buffers_and_bodies_are_refused_by_name(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, _ = new_job(store)
    with pytest.raises(StoreError, match="'positions' has dtype float64"):
        store.append_event(job.job_id, {"event": "mesh"}, {"positions": np.zeros((2, 3))})
    with pytest.raises(StoreError, match="'event' field"):
        store.append_event(job.job_id, {"stage": "coarse"})
    with pytest.raises(StoreError, match="no job 'nope'"):
        store.append_event("nope", {"event": "stage"})
    assert store.get_job(job.job_id).last_seq == 1


def test_everything_survives_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(50))
    created = store.create_job(owner="key-a", kind="refine_texture", prompt="p", params=PARAMS,
                               inputs={"image": image, "faces": np.array([[0, 1, 2]], dtype=np.int32)})
    job_id = created[0].job_id
    store.append_event(job_id, {"event": "stage", "stage": "texture", "steps": 4})
    store.save_checkpoint(job_id, b"step 3")
    store.save_checkpoint(job_id, b"step 4")
    assert not store.has_result(job_id)
    store.save_result(job_id, b"glTF...")
    store.close()
    reopened = JobStore(tmp_path)
    assert [e.seq for e in reopened.events_after(job_id, 0)] == [1, 2]
    assert reopened.load_checkpoint(job_id) == b"step 4"
    assert reopened.has_result(job_id) and reopened.load_result(job_id) == b"glTF..."
    inputs = reopened.load_inputs(job_id)
    assert inputs["image"] == image and inputs["faces"].tolist() == [[0, 1, 2]]
    assert reopened.append_event(job_id, {"event": "state", "state": "running"}).seq == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_claim_order_interrupted_first_then_submission_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a, b, c = (new_job(store)[0] for _ in range(3))
    record, resumed = store.claim_next()
    assert (record.job_id, record.state, resumed) == (a.job_id, "running", False)
    store.close()  # the process "dies" with a running
    store = JobStore(tmp_path)
    record, resumed = store.claim_next()
    assert (record.job_id, resumed) == (a.job_id, True)
    store.append_event(a.job_id, {"event": "state", "state": "done"}, state="done")
    assert store.cancel_if_queued(b.job_id).body == {"event": "state", "state": "cancelled"}
    assert store.cancel_if_queued(a.job_id) is None  # finished: nothing changes
    record, resumed = store.claim_next()
    assert (record.job_id, resumed) == (c.job_id, False)
    assert store.cancel_if_queued(c.job_id) is None  # running: the server flags the runner instead
    assert store.claim_next() is None  # c runs in this process: it is not claimed again
    assert {j.job_id: j.state for j in store.list_jobs()} == {
        a.job_id: "done", b.job_id: "cancelled", c.job_id: "running"}


def test_queue_limit_stores_nothing(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    new_job(store, max_queued=2)
    new_job(store, max_queued=2)
    assert store.create_job(owner="", kind="generate", prompt="p", params=PARAMS,
                            inputs={"image": b"x"}, max_queued=2) is None
    assert len(store.list_jobs()) == 2
    assert not (tmp_path / "jobs").exists()  # no inputs written for any of them


def test_owner_filter(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    mine, _ = new_job(store, owner="key-a")
    theirs, _ = new_job(store, owner="key-b")
    everyone, _ = new_job(store, owner="")
    assert [j.job_id for j in store.list_jobs(owner="key-a")] == [mine.job_id, everyone.job_id]
    assert [j.job_id for j in store.list_jobs()] == [mine.job_id, theirs.job_id, everyone.job_id]


def test_delete_hides_at_once_and_purge_removes_files(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, _ = new_job(store)
    store.append_event(job.job_id, {"event": "mesh"}, {"texture": b"png"})
    store.save_checkpoint(job.job_id, b"c")
    store.mark_deleted(job.job_id)
    assert store.get_job(job.job_id) is None and store.list_jobs() == []
    assert store.claim_next() is None
    store.close()
    reopened = JobStore(tmp_path)  # a crash between mark and purge: the next start finishes it
    assert not reopened.job_dir(job.job_id).exists()
    assert reopened.events_after(job.job_id, 0) == []
    assert reopened.is_deleted(job.job_id)


def test_two_threads_appending_never_share_a_seq(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, _ = new_job(store)

    def append(count: int) -> None:
        for _ in range(count):
            store.append_event(job.job_id, {"event": "stage", "stage": "coarse", "steps": 1})

    threads = [threading.Thread(target=append, args=(20,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.seq for e in store.events_after(job.job_id, 0)] == list(range(1, 42))


def test_checkpoint_must_be_bytes(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, _ = new_job(store)
    with pytest.raises(StoreError, match="must be bytes, got dict"):
        store.save_checkpoint(job.job_id, {"step": 1})
    assert store.load_checkpoint(job.job_id) is None

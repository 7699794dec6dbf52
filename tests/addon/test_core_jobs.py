"""ApplyQueue: events wait until applied; meshes are prepared on the worker; newer meshes supersede."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from blender_addon.core._protocol import Message
from blender_addon.core.jobs import ApplyQueue
from blender_addon.core.mesh import BlenderMesh, MeshDataError, prepare_mesh_event
from tests.backend.mesh_runner import load_obj

SUZANNE = Path(__file__).resolve().parents[2] / ".." / "shared" / "meshes" / "suzanne.obj"


def event(seq: int, kind: str, buffers: dict | None = None) -> Message:
    return Message(type="event", body={"event": kind}, buffers=buffers or {}, job_id="j" * 32, seq=seq)


def test_events_wait_in_order_and_newer_meshes_supersede_older_ones():
    verts, faces = load_obj(SUZANNE)
    release = threading.Event()
    started: list[int] = []

    def prepare(buffers: dict) -> BlenderMesh:
        started.append(len(buffers["positions"]))
        release.wait(10)  # hold the worker on the first mesh while the others arrive
        return prepare_mesh_event(buffers)

    queue = ApplyQueue()
    try:
        queue.push("a", event(1, "stage"), None)
        for seq, scale in ((2, 1.0), (3, 2.0), (4, 3.0)):
            queue.push("a", event(seq, "mesh", {"positions": verts * np.float32(scale), "faces": faces}), prepare)
        queue.push("a", event(5, "state"), None)
        assert queue.waiting("a") == 5
        assert queue.pop("a").seq == 1  # the stage event needs no preparation
        first = queue.head("a")
        assert first.seq == 2 and first.superseded  # skipped, though its preparation is under way
        queue.pop("a")
        assert queue.head("a").seq == 3 and queue.head("a").superseded
        queue.pop("a")
        assert queue.head("a") is None  # seq 4 is being prepared: nothing to apply yet
        release.set()
        newest = queue.jobs["a"][0].prepared.result(timeout=10)
        assert queue.head("a").seq == 4 and not queue.head("a").superseded
        np.testing.assert_allclose(newest.verts_vx3.max(axis=0), 3.0 * verts.max(axis=0), rtol=1e-6)
        assert len(started) == 2  # seq 3 was cancelled before it started
        queue.pop("a")
        assert queue.pop("a").seq == 5 and not queue
    finally:
        release.set()
        queue.close()


def test_a_bad_mesh_fails_on_the_worker_with_its_buffer_named():
    verts, faces = load_obj(SUZANNE)
    queue = ApplyQueue()
    try:
        bad_faces = faces.copy()
        bad_faces[0, 0] = len(verts)
        queue.push("a", event(1, "mesh", {"positions": verts, "faces": bad_faces}), prepare_mesh_event)
        error = queue.jobs["a"][0].prepared.exception(timeout=10)
        assert isinstance(error, MeshDataError) and "faces" in str(error) and str(len(verts)) in str(error)
    finally:
        queue.close()

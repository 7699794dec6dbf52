"""The pipeline behind the real server: `python -m backend serve --models tiny` as a process,
killed during the geometry stage and restarted on the same store, resumes the job from its
checkpoint and finishes with a textured result; the same server then refines a mesh."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from protocol.messages import Message
from protocol.transport import ClientSocket

REPO_ROOT = Path(__file__).resolve().parents[2]
MESHES = REPO_ROOT / ".." / "shared" / "meshes"


def start_server(store: Path, log_path: Path, *flags: str, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`python -m backend serve --models tiny --device cpu [FLAGS]` on a free loopback port, in this
    process's environment as it is now (a Ray this process started has set RAY_AUTH_MODE)."""
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "serve", "--models", "tiny", "--device", "cpu",
         "--store", str(store), "--bind", "tcp://127.0.0.1:*", *flags],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.findall(r"listening on (\S+)", log_path.read_text(errors="replace"))
        if found:
            return process, found[-1]
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"the server did not start:\n{log_path.read_text()}")


def close_all(clients: list[ClientSocket], processes: list[subprocess.Popen]) -> None:
    """Close the clients, kill the servers that still run, wait for each to end."""
    for client in clients:
        client.close()
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def events_of(client: ClientSocket, job_id: str, until, timeout_s: float) -> list[Message]:
    """Event messages of `job_id` until `until(message)` is true."""
    events: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = client.recv(200)
        if msg is None or msg.type != "event" or msg.job_id != job_id:
            continue
        events.append(msg)
        if until(msg):
            return events
    raise TimeoutError(f"waited {timeout_s} s; got {[e.body for e in events]}")


def test_server_killed_in_the_geometry_stage_resumes_the_job(tmp_path: Path) -> None:
    import trimesh

    store = tmp_path / "store"
    processes: list[subprocess.Popen] = []
    clients: list[ClientSocket] = []
    try:
        # 1. Submit a generate job and let it reach the geometry stage.
        first, address = start_server(store, tmp_path / "first.log")
        processes.append(first)
        client = ClientSocket(address)
        clients.append(client)
        params = {"prompt": "a cat", "steps": {"coarse": 3, "geometry": 6, "texture": 2},
                  "mesh_every": 10, "preview_every": 2, "texture_size": 256}
        reply = client.request(Message("submit", {"kind": "generate", "params": params}), timeout_s=30)
        assert reply.type == "accepted", reply.body
        job_id = reply.body["job_id"]
        before = events_of(client, job_id, lambda m: m.body.get("stage") == "geometry"
                           and m.body["event"] == "stage", timeout_s=240)
        assert any(e.body["event"] == "mesh" and e.body["stage"] == "coarse" for e in before)
        # 2. kill -9 mid-stage, restart on the same store.
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second, address = start_server(store, tmp_path / "second.log")
        processes.append(second)
        client = ClientSocket(address)
        clients.append(client)
        client.request(Message("subscribe", {"job_id": job_id, "after_seq": 0}), timeout_s=30)
        log = events_of(client, job_id, lambda m: m.body["event"] == "state"
                        and m.body["state"] in ("done", "failed", "cancelled"), timeout_s=300)
        # 3. The stored events come back unchanged, then the resumed run finishes.
        assert [e.seq for e in log] == list(range(1, len(log) + 1))
        assert [e.body for e in log[: len(before)]] == [e.body for e in before]
        assert log[-1].body["state"] == "done", log[-1].body
        resumed = [e for e in log if e.body.get("state") == "running" and e.body.get("resumed")]
        assert len(resumed) == 1
        after = log[log.index(resumed[0]):]
        resumed_stages = [e.body["stage"] for e in after if e.body["event"] == "stage"]
        assert resumed_stages in (["geometry", "texture"], ["texture"]), resumed_stages
        final = [e for e in log if e.body["event"] == "mesh" and e.body["final"]]
        assert len(final) == 1 and final[0] is log[-2]
        assert {"positions", "faces", "uvs", "texture"} <= set(final[0].buffers)
        # 4. The result is the textured GLB.
        result = client.request(Message("get_result", {"job_id": job_id}), timeout_s=30)
        assert result.type == "result", result.body
        mesh = trimesh.load(io.BytesIO(bytes(result.buffers["model"])), file_type="glb", force="mesh")
        assert len(mesh.faces) == final[0].body["face_count"]
        assert mesh.visual.uv is not None and mesh.visual.material.baseColorTexture is not None
        np.testing.assert_array_equal(np.asarray(final[0].buffers["faces"]).shape, (len(mesh.faces), 3))
        # 5. The same server (models loaded once) runs a refine job next: the geometry is kept.
        from backend.meshio import load_mesh

        suzanne = load_mesh(MESHES / "suzanne.obj", triangulate=True)
        buffers = {"positions": suzanne.verts_vx3.astype("<f4"), "faces": suzanne.faces_fx3.astype("<i4")}
        submit = Message("submit", {"kind": "refine_texture", "params": {
            "prompt": "a bronze monkey head", "steps": {"texture": 2}, "mesh_every": 10,
            "texture_size": 256}}, buffers)
        reply = client.request(submit, timeout_s=30)
        assert reply.type == "accepted", reply.body
        refined = events_of(client, reply.body["job_id"], lambda m: m.body["event"] == "state"
                            and m.body["state"] in ("done", "failed", "cancelled"), timeout_s=240)
        assert refined[-1].body["state"] == "done", refined[-1].body
        last = [e for e in refined if e.body["event"] == "mesh" and e.body["final"]][0]
        positions = np.asarray(last.buffers["positions"])
        faces = np.asarray(last.buffers["faces"])
        # Seams split vertices, they never move them: every corner is where it was.
        np.testing.assert_allclose(positions[faces], suzanne.verts_vx3[suzanne.faces_fx3], atol=0)
    finally:
        close_all(clients, processes)

"""A job runner for server tests that streams real meshes, and the harness the tests share.

`MeshRunner` does no optimisation: each "step" it sleeps `step_delay_s`, reports progress, emits
a `mesh` event with a real mesh from the shared meshes folder (scaled up step by step), and saves
a checkpoint saying where it is, so a restarted server resumes it. A prompt containing "fail"
makes it raise; a refine job streams the mesh it was sent.

    python -m tests.backend.mesh_runner --bind tcp://127.0.0.1:* --store DIR [--step-delay S]

runs the real server with this runner (the subprocess tests use it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np

from backend.jobs import JobContext, JobFailed

REPO_ROOT = Path(__file__).resolve().parents[2]
MESHES_DIR = REPO_ROOT / ".." / "shared" / "meshes"
MESH_FILES = {"spot": "spot.obj", "bunny": "stanford-bunny.obj", "teapot": "teapot.obj", "suzanne": "suzanne.obj"}
"""Prompt word -> mesh file; a prompt naming none gets suzanne (the smallest)."""
STAGES = ("coarse", "geometry", "texture")


def load_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(verts_vx3 float32, faces_fx3 int32) of an OBJ file; polygons are fanned into triangles."""
    verts: list[list[float]] = []
    faces: list[list[int]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
            corners = [int(p.split("/")[0]) for p in parts[1:]]
            corners = [c - 1 if c > 0 else len(verts) + c for c in corners]
            if len(corners) < 3:
                raise ValueError(f"{path}:{number}: a face needs 3 corners, got {line!r}")
            faces.extend([corners[0], corners[i], corners[i + 1]] for i in range(1, len(corners) - 1))
    verts_vx3 = np.asarray(verts, dtype=np.float32).reshape(-1, 3)
    faces_fx3 = np.asarray(faces, dtype=np.int32).reshape(-1, 3)
    if faces_fx3.size and (faces_fx3.min() < 0 or faces_fx3.max() >= len(verts_vx3)):
        raise ValueError(f"{path}: a face index is outside 0..{len(verts_vx3) - 1}")
    return verts_vx3, faces_fx3


def glb_bytes(verts_vx3: np.ndarray, faces_fx3: np.ndarray) -> bytes:
    """The mesh as a binary glTF, written by trimesh."""
    import trimesh

    return trimesh.Trimesh(vertices=verts_vx3, faces=faces_fx3, process=False).export(file_type="glb")


@dataclass
class Checkpoint:
    """Where a MeshRunner job is: the next step to run."""

    stage_index: int
    """Index into the job's stages of the stage in progress."""
    step: int
    """The next step of that stage."""

    def to_bytes(self) -> bytes:
        return msgpack.packb({"stage_index": self.stage_index, "step": self.step})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Checkpoint":
        raw = msgpack.unpackb(data)
        return cls(stage_index=int(raw["stage_index"]), step=int(raw["step"]))


@dataclass
class MeshRunner:
    """A `backend.jobs.JobRunner` streaming real meshes (see the module docstring)."""

    meshes_dir: Path = MESHES_DIR
    """Folder of the OBJ files."""
    step_delay_s: float = 0.0
    """Sleep per step, so tests can act while a job runs."""
    steps_per_stage: int = 3
    """Steps of each stage unless the job's params.steps overrides it."""
    device: str = "cpu"
    """For `welcome`."""
    models: dict[str, str] = field(default_factory=lambda: {"mesh": "mesh_runner"})
    """For `welcome`."""
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def run(self, ctx: JobContext) -> None:
        # 1. The mesh to stream: the one sent (refine) or the one the prompt names.
        prompt = ctx.params.prompt
        if "refuse" in prompt:
            raise JobFailed(f"the mesh runner refuses the prompt {prompt!r}; change it")
        if "fail" in prompt:
            raise RuntimeError(f"the mesh runner was asked to fail by the prompt {prompt!r}\nsecond line")
        verts_vx3, faces_fx3 = self._mesh(ctx)
        stages = ("texture",) if ctx.kind == "refine_texture" else STAGES
        where = Checkpoint(0, 0)
        saved = ctx.load_checkpoint() if ctx.resumed else None
        if saved is not None:
            where = Checkpoint.from_bytes(saved)
        # 2. Each stage: a stage event, then one mesh per step, checkpoint after each step.
        for stage_index in range(where.stage_index, len(stages)):
            stage = stages[stage_index]
            steps = self._steps(ctx, stage)
            ctx.emit("stage", {"stage": stage, "steps": steps})
            first = where.step if stage_index == where.stage_index else 0
            for step in range(first, steps):
                ctx.check_cancelled()
                time.sleep(self.step_delay_s)
                scale = 1.0 + 0.1 * (step + 1) / max(steps, 1)
                ctx.progress(stage, step + 1, steps, eta_s=self.step_delay_s * (steps - step - 1),
                             losses={"scale": scale})
                ctx.emit("mesh", {"stage": stage, "step": step + 1, "final": False, "emitted_at": time.time()},
                         {"positions": verts_vx3 * scale, "faces": faces_fx3})
                ctx.save_checkpoint(Checkpoint(stage_index, step + 1).to_bytes())
        # 3. The result: the GLB first, then the final mesh event.
        ctx.set_result(glb_bytes(verts_vx3, faces_fx3))
        last_stage = stages[-1]
        ctx.emit("mesh", {"stage": last_stage, "step": self._steps(ctx, last_stage), "final": True},
                 {"positions": verts_vx3, "faces": faces_fx3})

    def _steps(self, ctx: JobContext, stage: str) -> int:
        override = getattr(ctx.params.steps, stage, None)
        return self.steps_per_stage if override is None else int(override)

    def _mesh(self, ctx: JobContext) -> tuple[np.ndarray, np.ndarray]:
        if ctx.kind == "refine_texture":
            return np.asarray(ctx.inputs["positions"]), np.asarray(ctx.inputs["faces"])
        name = next((word for word in MESH_FILES if word in ctx.params.prompt), "suzanne")
        if name not in self._cache:
            self._cache[name] = load_obj(self.meshes_dir / MESH_FILES[name])
        return self._cache[name]


# The harness the server tests share ------------------------------------------------------------


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
    preexec_fn: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start the mesh-runner server in a child process; wait until it logs its address.
    Give each start its own `log_path`; `preexec_fn` runs in the child before it starts (limits)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.backend.mesh_runner", "--bind", bind, "--store", str(store), *extra],
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


class ServerThread:
    """A `backend.server.Server` running in a thread of the test process."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._thread.start()
        if not server.ready.wait(10):
            raise RuntimeError(f"the server did not start: {self._error!r}")
        self.address: str = server.bound_address

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # reported by the constructor or `stop`
            self._error = exc
            raise

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(20)
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop within 20 s")


def collect_until_final(client: Any, job_id: str, timeout_s: float = 20.0) -> list[Any]:
    """Every `event` message of `job_id` the client receives until the job's last state event."""
    events = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = client.recv(100)
        if msg is None or msg.type != "event" or msg.job_id != job_id:
            continue
        events.append(msg)
        if msg.body["event"] == "state" and msg.body["state"] in ("done", "failed", "cancelled"):
            return events
    raise TimeoutError(f"job {job_id} did not end within {timeout_s} s; got {[e.body for e in events]}")


def iter_events(client: Any, timeout_s: float) -> Iterator[Any]:
    """Event messages as they arrive, for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = client.recv(100)
        if msg is not None and msg.type == "event":
            yield msg


# A benchmark of the server around the runner ---------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(argv: list[str]) -> int:
    """`python -m tests.backend.mesh_runner bench --store DIR`: idle CPU of a server process,
    then per mesh: events/s through store and socket, and the latency from `ctx.emit` (the
    runner's `emitted_at`) to the client having decoded the event."""
    from protocol.messages import Message
    from protocol.transport import ClientSocket

    parser = argparse.ArgumentParser(prog="python -m tests.backend.mesh_runner bench")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30, help="mesh events per stage")
    parser.add_argument("--idle-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    args.store.mkdir(parents=True, exist_ok=True)
    server = start_server_process(args.store / "store", args.store / "bench.log", "--steps-per-stage", str(args.steps))
    client = ClientSocket(server.address)
    try:
        # 1. Idle: no client traffic, no job.
        before = _cpu_seconds(server.process.pid)
        time.sleep(args.idle_s)
        idle = (_cpu_seconds(server.process.pid) - before) / args.idle_s
        print(f"idle server CPU: {100 * idle:.2f}% of one core over {args.idle_s:g} s")
        # 2. One job per mesh: every step stores and sends a mesh event.
        for name in ("suzanne", "spot", "bunny"):
            started = time.monotonic()
            client.request(Message("submit", {"kind": "generate", "params": {"prompt": name}}), 10)
            latencies, count, nbytes = [], 0, 0
            for msg in iter_events(client, 600):
                if msg.body["event"] == "mesh" and not msg.body["final"]:
                    latencies.append(time.time() - msg.body["emitted_at"])
                    count += 1
                    nbytes += sum(np.asarray(b).nbytes for b in msg.buffers.values())
                if msg.body.get("state") in ("done", "failed", "cancelled"):
                    break
            wall = time.monotonic() - started
            print(
                f"{name}: {count} mesh events ({nbytes / count / 2**20:.2f} MiB each) in {wall:.2f} s "
                f"= {count / wall:.1f} events/s; emit-to-receive latency median "
                f"{1000 * float(np.median(latencies)):.2f} ms, max {1000 * max(latencies):.2f} ms"
            )
    finally:
        client.close()
        server.process.send_signal(__import__("signal").SIGTERM)
        server.process.wait(20)
    return 0


# The entry for subprocess tests ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from backend.logging_setup import configure_logging
    from backend.server import ServerConfig, serve

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tests.backend.mesh_runner")
    parser.add_argument("--bind", default="tcp://127.0.0.1:*")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--keys", type=Path, default=None)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--steps-per-stage", type=int, default=3)
    args = parser.parse_args(argv)
    configure_logging(args.store)
    runner = MeshRunner(step_delay_s=args.step_delay, steps_per_stage=args.steps_per_stage)
    config = ServerConfig(store_dir=args.store, bind=args.bind, keys_dir=args.keys,
                          insecure=args.insecure, max_queue=args.max_queue)
    return serve(config, runner)


if __name__ == "__main__":
    sys.exit(main())

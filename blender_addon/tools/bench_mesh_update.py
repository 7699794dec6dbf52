"""Main-thread cost of the add-on's mesh updates, in the bpy module (not part of the extension zip).

    .venv/bin/python blender_addon/tools/bench_mesh_update.py [--repeat 3]

Builds the extension zip as `build.py addon` does, installs it into a private user-resources
folder, and times what runs on Blender's main thread, the part that freezes the viewport:

- `update 100k`: one `mesh` event of a 100k-face torus with UVs split along its seams, from its
  wire frames: decoding, queueing, and applying it once the worker thread has prepared it.
- `update 500k + 2048 texture`: the same at 500k faces with a 2048² PNG texture.
- `then same 500k moved`: the 500k event, then the same triangles moved (the texture stage streams
  one topology), applied one after the other: the second only moves the positions.
- `catch-up 31 bunnies`: 31 Stanford-bunny mesh events arriving together (a file reopened while
  its job streamed): all of them decoded and queued, the newest applied.
- `refine export 600k tris`: Refine Texture's export of a 300k-quad mesh with a UV map: reading
  it on the main thread; its 600k triangles are split by UV on the worker.

The worker's time (welding, edges: off the main thread) is printed beside it. Each case runs
`--repeat` times; min / median / max are printed with the machine's load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE = "bl_ext.user_default.dreamloom"
BUNNY = REPO / ".." / "shared" / "meshes" / "stanford-bunny.obj"


def torus(faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A torus grid with about `faces` triangles, split along its two UV seams like the wire
    format: (positions_nx3, faces_mx3, uvs_nx2); seam copies hold bit-identical positions."""
    ring = int(np.sqrt(faces / 2.0))
    u_count, v_count = ring, max(3, faces // (2 * ring))
    u_i = np.arange(u_count + 1)
    v_i = np.arange(v_count + 1)
    uu, vv = np.meshgrid(u_i, v_i, indexing="ij")
    theta = 2 * np.pi * (uu % u_count) / u_count  # the last column repeats the first exactly
    phi = 2 * np.pi * (vv % v_count) / v_count
    positions = np.stack([(1 + 0.3 * np.cos(phi)) * np.cos(theta), (1 + 0.3 * np.cos(phi)) * np.sin(theta),
                          0.3 * np.sin(phi)], axis=-1).reshape(-1, 3).astype(np.float32)
    uvs = np.stack([uu / u_count, vv / v_count], axis=-1).reshape(-1, 2).astype(np.float32)
    index = (uu * (v_count + 1) + vv)[:-1, :-1].reshape(-1)
    right, up = index + (v_count + 1), index + 1
    tris = np.concatenate([np.stack([index, right, right + 1], 1), np.stack([index, right + 1, up], 1)])
    return positions, tris.astype(np.int32), uvs


def png(size: int) -> bytes:
    """An RGB PNG of `size`² pixels: gradients with noise (compresses about as well as a texture)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), -1)
    rgb = (rgb + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = size.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def build_zip() -> Path:
    spec = importlib.util.spec_from_file_location("dreamloom_build", REPO / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.build_addon(Path(sys.executable))


class Addon:
    """The installed extension's modules and a job row to stream into."""

    def __init__(self, bpy) -> None:
        self.bpy = bpy
        self.runtime = sys.modules[f"{MODULE}.runtime"]
        self.session = sys.modules[f"{MODULE}.core.session"]
        self.jobs = sys.modules[f"{MODULE}.core.jobs"]
        self.protocol = sys.modules[f"{MODULE}.core._protocol"]
        self.importer = sys.modules[f"{MODULE}.importer"]
        self.count = 0

    def frames(self, job_id: str, seq: int, buffers: dict) -> list[bytes]:
        body = {"event": "mesh", "stage": "geometry", "step": seq, "final": False}
        message = self.protocol.Message(type="event", job_id=job_id, seq=seq, body=body, buffers=buffers)
        return [bytes(frame) for frame in self.protocol.codec.encode(message)]

    def stream(self, buffers_list: list[dict], already: list[dict] = ()) -> tuple[float, float]:
        """Main-thread seconds to decode, queue and apply these events of a new job (all arrive
        together; the job's object ends up with the last), and the worker's seconds. The events
        in `already` are applied first, untimed."""
        self.count += 1
        job_id = f"{self.count:032x}"
        item = self.runtime.add_job_item(self.bpy.context.scene, job_id, "generate", f"bench {self.count}")
        record = self.jobs.JobRecord(job_id=job_id)
        wire = [self.frames(job_id, seq, b) for seq, b in enumerate([*already, *buffers_list], start=1)]
        self.apply(record, wire[:len(already)])
        main_s, worker_s = self.apply(record, wire[len(already):])
        if item.note:
            raise RuntimeError(item.note)
        return main_s, worker_s

    def apply(self, record, wire: list[list[bytes]]) -> tuple[float, float]:
        """Decode and queue the messages, then apply them once prepared: (main, worker) seconds."""
        start = time.perf_counter()
        for frames in wire:  # what pump() does with each message off the socket
            message = self.protocol.codec.decode(frames)
            for event in record.accept(int(message.seq), message):
                self.runtime.dispatch(self.session.JobEvent(record, event))
        main_s = time.perf_counter() - start
        worker_start = time.perf_counter()
        while self.runtime.STATE.queue.waiting(record.job_id):
            start = time.perf_counter()
            self.runtime.apply_waiting()
            main_s += time.perf_counter() - start
            time.sleep(0.001)
        return main_s, time.perf_counter() - worker_start


def read_bunny() -> tuple[np.ndarray, np.ndarray]:
    verts, faces = [], []
    for line in BUNNY.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts and parts[0] == "f":
            corners = [int(p.split("/")[0]) - 1 for p in parts[1:]]
            faces.extend([corners[0], corners[i], corners[i + 1]] for i in range(1, len(corners) - 1))
    return np.asarray(verts, np.float32), np.asarray(faces, np.int32)


def refine_export_s(bpy, importer, faces: int) -> tuple[float, float]:
    """Seconds of Refine Texture's export of a quad grid with `faces` / 2 quads: on the main
    thread (reading the mesh), and the split by UV the worker does."""
    side = int(np.sqrt(faces / 2.0))
    bpy.ops.mesh.primitive_grid_add(x_subdivisions=side, y_subdivisions=side, size=2.0)
    obj = bpy.context.active_object
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.uv.smart_project()
    bpy.ops.object.mode_set(mode="OBJECT")
    start = time.perf_counter()
    export = importer.export_for_refine(obj, bpy.context.evaluated_depsgraph_get())
    main_s = time.perf_counter() - start
    start = time.perf_counter()
    split = export.split()
    worker_s = time.perf_counter() - start
    assert len(split.faces_mx3) >= faces * 0.98, len(split.faces_mx3)
    bpy.data.objects.remove(obj)
    return main_s, worker_s


def summary(name: str, main_s: list[float], worker_s: list[float] | None = None) -> str:
    ms = sorted(1000 * s for s in main_s)
    text = f"{name:<28} main thread {ms[0]:7.1f} / {statistics.median(ms):7.1f} / {ms[-1]:7.1f} ms"
    if worker_s:
        text += f"   worker {1000 * statistics.median(worker_s):7.1f} ms (median)"
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_mesh_update.py")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    archive = build_zip()
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="dreamloom_bench_")
    import bpy

    bpy.ops.extensions.package_install_files(filepath=str(archive), repo="user_default", enable_on_install=True)
    addon = Addon(bpy)
    print(f"bpy {bpy.app.version_string}, {os.cpu_count()} cores, load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    positions, tris, uvs = torus(100_000)
    small = {"positions": positions, "faces": tris, "uvs": uvs}
    positions, tris, uvs = torus(500_000)
    large = {"positions": positions, "faces": tris, "uvs": uvs, "texture": png(2048)}
    verts, faces = read_bunny()
    bunnies = [{"positions": verts * np.float32(1 + 0.01 * i), "faces": faces} for i in range(31)]
    moved = {**large, "positions": large["positions"] * np.float32(1.1)}
    cases = [(f"update {len(small['faces']) // 1000}k", [small], []),
             (f"update {len(large['faces']) // 1000}k + 2048 texture", [large], []),
             (f"then same {len(large['faces']) // 1000}k moved", [moved], [large]),
             ("catch-up 31 bunnies", bunnies, [])]
    for name, events, already in cases:
        runs = [addon.stream(events, already) for _ in range(args.repeat)]
        print(summary(name, [m for m, _ in runs], [w for _, w in runs]), flush=True)
    exports = [refine_export_s(bpy, addon.importer, 600_000) for _ in range(args.repeat)]
    print(summary("refine export 600k tris", [m for m, _ in exports], [w for _, w in exports]), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What running jobs on a Ray worker costs against the in-process worker:
`python -m backend.bench_cluster --store DIR [--jobs N] [--models tiny] [--device cpu]`.

Runs the same small generate job N times, one after another, through a real front (ROUTER
socket, job store, a client on loopback): first with the in-process worker, then with one Ray
worker on a local Ray (`ray.init`, no dashboard). Per path it reports the median seconds from
`submit` to the `done` event, from `submit` to the `running` event (the claim) and to the first
`stage` event (the job reached the runner), and the events per job. Prints one JSON object.
Model loading is outside those timings (both paths load once, before the first job); the start of
the Ray path is reported on its own: `ray_init_s` and `workers_start_s` (the worker's process and
its model load). DIR must not exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from backend.server import Server, ServerConfig
from protocol.messages import Message
from protocol.transport import ClientSocket

PARAMS = {"prompt": "a cat", "steps": {"coarse": 2, "geometry": 2, "texture": 1}, "mesh_every": 10,
          "preview_every": 2, "texture_size": 256}
"""The job timed: a few steps of each stage."""


def time_jobs(server: Server, jobs: int) -> dict[str, Any]:
    """Serve with `server` in a thread; run `jobs` jobs one after another; the medians."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.ready.wait(30)
    client = ClientSocket(server.bound_address)
    done_s, running_s, stage_s, events = [], [], [], []
    try:
        for _ in range(jobs + 1):  # the first one warms up (first calls, caches): not counted
            started = time.perf_counter()
            reply = client.request(Message("submit", {"kind": "generate", "params": PARAMS}), timeout_s=30)
            job_id, seen, marks = reply.body["job_id"], 0, {}
            while "done" not in marks:
                msg = client.recv(100)
                if msg is None or msg.type != "event" or msg.job_id != job_id:
                    continue
                seen += 1
                key = msg.body.get("state") or msg.body["event"]
                marks.setdefault(key, time.perf_counter() - started)
                if key in ("failed", "cancelled"):
                    raise RuntimeError(f"the timed job ended {key}: {msg.body}")
            running_s.append(marks["running"])
            stage_s.append(marks["stage"])
            done_s.append(marks["done"])
            events.append(seen)
    finally:
        client.close()
        server.stop()
        thread.join(30)
    return {"submit_to_done_s": round(statistics.median(done_s[1:]), 3),
            "submit_to_running_s": round(statistics.median(running_s[1:]), 4),
            "submit_to_first_stage_s": round(statistics.median(stage_s[1:]), 4),
            "events_per_job": events[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.bench_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a folder that does not exist yet")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--models", default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.store.exists():
        parser.error(f"--store {args.store} exists; give a new folder")
    from backend.pipeline import make_runner

    def config(name: str) -> ServerConfig:
        return ServerConfig(store_dir=args.store / name, bind="tcp://127.0.0.1:*", device=args.device)

    local = time_jobs(Server(config("local"), make_runner(args.models, args.device)), args.jobs)
    import ray

    from backend.cluster import start_workers, stop_workers

    started = time.perf_counter()
    ray.init(num_cpus=1, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray_init_s = time.perf_counter() - started
    pool = start_workers(args.models, args.device, 1 if args.device == "cpu" else None)
    workers_start_s = time.perf_counter() - started - ray_init_s
    try:
        on_ray = time_jobs(Server(config("ray"), None, None, pool), args.jobs)
    finally:
        stop_workers(pool)
        ray.shutdown()
    print(json.dumps({"jobs": args.jobs, "models": args.models, "device": args.device,
                      "in_process": local, "ray": on_ray,
                      "ray_init_s": round(ray_init_s, 3), "workers_start_s": round(workers_start_s, 3),
                      "ray_overhead_s": round(on_ray["submit_to_done_s"] - local["submit_to_done_s"], 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Protocol speed: codec cost of a large mesh message, loopback transfer, small request latency.

    python -m protocol.bench [--vertices 1000000] [--pings 2000]

Prints one line per measurement. Numbers for this machine are in docs/protocol.md.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from .codec import decode, encode
from .messages import REPLY_FOR, Message, reply_to
from .transport import ClientSocket, ServerSocket


def mesh_message(vertex_count: int, rng: np.random.Generator) -> Message:
    """A `mesh` event the size of a streamed mesh: positions, faces (2 per vertex), uvs, colours."""
    positions_nx3 = rng.standard_normal((vertex_count, 3)).astype(np.float32)
    faces_mx3 = rng.integers(0, vertex_count, size=(2 * vertex_count, 3), dtype=np.int32)
    uvs_nx2 = rng.random((vertex_count, 2), dtype=np.float32)
    colors_nx3 = rng.integers(0, 256, size=(vertex_count, 3), dtype=np.uint8)
    body = {"event": "mesh", "stage": "geometry", "step": 250, "final": False,
            "vertex_count": vertex_count, "face_count": 2 * vertex_count, "bbox": [[-1, -1, -1], [1, 1, 1]]}
    buffers = {"positions": positions_nx3, "faces": faces_mx3, "uvs": uvs_nx2, "colors": colors_nx3}
    return Message("event", body, buffers, job_id="bench", seq=1)


def best_of(repeats: int, fn) -> float:
    """Fastest of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_codec(message: Message, size_mb: float) -> None:
    frames = encode(message)
    as_bytes = [bytes(f) for f in frames]
    encode_s = best_of(20, lambda: encode(message))
    decode_s = best_of(20, lambda: decode(as_bytes))
    print(f"encode  mesh event {size_mb:.1f} MB: {encode_s * 1e6:.0f} us (zero-copy)")
    print(f"decode  mesh event {size_mb:.1f} MB: {decode_s * 1e6:.0f} us (zero-copy)")


def serve(server: ServerSocket, stop: threading.Event, received: list[float]) -> None:
    """Answer requests; note the arrival time of every event."""
    while not stop.is_set():
        incoming = server.recv(20)
        if incoming is None or incoming.message is None:
            continue
        if incoming.message.type == "event":
            received.append(time.perf_counter())
        elif incoming.message.type in REPLY_FOR:
            server.send(incoming.peer, reply_to(incoming.message, REPLY_FOR[incoming.message.type]))


def bench_transport(message: Message, size_mb: float, pings: int) -> None:
    with ServerSocket("tcp://127.0.0.1:0") as server, ClientSocket(server.bound_address) as client:
        stop, received = threading.Event(), []
        thread = threading.Thread(target=serve, args=(server, stop, received), daemon=True)
        thread.start()
        try:
            client.request(Message("ping"), timeout_s=5)  # connected
            # 1. Small request round trips.
            latencies = []
            for _ in range(pings):
                start = time.perf_counter()
                client.request(Message("ping"), timeout_s=5)
                latencies.append(time.perf_counter() - start)
            latencies.sort()
            print(f"ping -> pong over tcp loopback: median {statistics.median(latencies) * 1e6:.0f} us, "
                  f"p99 {latencies[int(0.99 * len(latencies))] * 1e6:.0f} us ({pings} requests)")
            # 2. Large event, client -> server, until decoded on the server.
            transfers = []
            for _ in range(5):
                count = len(received)
                start = time.perf_counter()
                client.send(message)
                while len(received) == count:
                    time.sleep(0.0005)
                transfers.append(received[-1] - start)
            best = min(transfers)
            print(f"mesh event {size_mb:.1f} MB over tcp loopback: {best * 1e3:.1f} ms "
                  f"({size_mb / best:.0f} MB/s, best of 5)")
        finally:
            stop.set()
            thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--vertices", type=int, default=1_000_000, help="vertices of the mesh event")
    parser.add_argument("--pings", type=int, default=2000, help="small requests to time")
    args = parser.parse_args(argv)
    message = mesh_message(args.vertices, np.random.default_rng(0))
    size_mb = sum(np.asarray(b).nbytes for b in message.buffers.values()) / 1e6
    bench_codec(message, size_mb)
    bench_transport(message, size_mb, args.pings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

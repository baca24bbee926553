"""What one call per neighbour (instead of Health, then Fetch) could save an atoll round, measured on loopback.

A daemon asks each neighbour's Health for its signed record (waiting until the snapshot is served), then Fetches the
snapshot checked against the digest in that record. This times both calls against one server holding a
demo-sized model (digits MLP, width 128: 9,610 float32 parameters), client and server in this process, one
intra-op thread: the Health call is the most a merged call could save per neighbour and round.

    .venv/bin/python scripts/health-vs-fetch.py   # medians of 5 repeats of 200 calls each
"""

import statistics
import time

import torch

from p2pd.client import SwarmClient
from p2pd.server import SwarmServer
from p2pd.store import SnapshotStore
from p2pd.tensors import SnapshotKey

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
state = {
    "0.weight": torch.randn(128, 64, generator=gen),
    "0.bias": torch.randn(128, generator=gen),
    "2.weight": torch.randn(10, 128, generator=gen),
    "2.bias": torch.randn(10, generator=gen),
}
store = SnapshotStore(keep=2)
server = SwarmServer(store, lambda: b"r" * 600)  # a signed record is about 600 bytes
server.start()
key = SnapshotKey("model", 1)
published = store.publish(key, state)
calls = {
    "health": lambda c: c.health(timeout=5, wait_for=key, wait=1.0),
    "fetch": lambda c: c.fetch(key, expected_digest=published.digest, timeout=5),
}
wall: dict[str, list[float]] = {name: [] for name in calls}
cpu: dict[str, list[float]] = {name: [] for name in calls}
try:
    with SwarmClient(server.address) as client:
        for _ in range(50):  # warm up: channel, threads, allocator
            for call in calls.values():
                call(client)
        for _ in range(5):
            for name, call in calls.items():  # alternated
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(200):
                    call(client)
                wall[name].append((time.perf_counter() - t0) / 200 * 1e3)
                cpu[name].append((time.process_time() - c0) / 200 * 1e3)
finally:
    server.stop(0)
print("| call | wall (ms) | CPU, client + server (ms) |\n|---|---:|---:|")
for name in calls:
    print(f"| {name} | {statistics.median(wall[name]):.3f} | {statistics.median(cpu[name]):.3f} |")

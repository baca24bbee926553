"""`atoll bench transport`: snapshot exchange throughput over loopback, against baselines.

Four paths move the same state dict (MLP-like: 1024x1024 fp32 layers plus biases) from a
server process to this process, each timed end to end (request to usable tensors):

- ``copy``      in-process ``dst.copy_(src)`` of every tensor into tensors already in memory:
                the memory-bandwidth ceiling.
- ``grpc_raw``  a bare gRPC unary-stream of the raw bytes in 4 MiB messages, no protobuf, no
                checks, bytes only counted: what gRPC itself can do here.
- ``atoll``     ``SwarmClient.fetch``: protobuf parts, tensors rebuilt, BLAKE3 digest checked
                against the one the server announced, NaN/Inf check.
- ``atoll_reuse`` the same, decoding into the previous fetch's tensors (``fetch(into=...)``),
                as a node does each round with one buffer set per neighbour.
- ``atoll_libp2p`` ``Libp2pClient.fetch``: the same fetch and checks over a libp2p stream of the
                DHT's daemon (p2pd/libp2p.py), the path neighbours take to a node behind NAT
                (`relayed`); on loopback the stream rides a direct libp2p connection.
- ``hivemind``  hivemind's libp2p stream (``P2P`` protobuf handler, ``serialize_torch_tensor``
                + ``split_for_streaming`` in 2 MiB parts, ``deserialize_tensor_stream``).
- ``atoll_fp16``, ``atoll_bf16``, ``atoll_int8``, ``atoll_topk1``: ``SwarmClient.fetch`` of the
                snapshot coded by p2pd/codecs.py (top-k at 1%), decoded to float32 tensors with
                every check. Their GB/s is *effective*: float32 model bytes made usable per
                second; the publisher's one-off encoding time is reported beside it.

The server side of every network path runs in one separate (spawned) process, so client
and server do not share a GIL. Each figure is the best of ``repeats`` runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CODED = {
    "atoll_fp16": ("fp16", 0.01),
    "atoll_bf16": ("bf16", 0.01),
    "atoll_int8": ("int8", 0.01),
    "atoll_topk1": ("topk", 0.01),
}
PATHS = ("copy", "grpc_raw", "atoll", "atoll_reuse", "atoll_libp2p", "hivemind", *CODED)
# what each path is, for a reader of the plot (see the module docstring)
LEGEND = {
    "copy": "in-process copy (memory ceiling)",
    "grpc_raw": "bare gRPC byte stream, no checks",
    "atoll": "atoll fetch (decode, digest, NaN check)",
    "atoll_reuse": "atoll fetch into reused tensors",
    "atoll_libp2p": "atoll fetch over libp2p (the relay path)",
    "hivemind": "hivemind libp2p tensor stream",
    "atoll_fp16": "atoll fetch, fp16 (effective)",
    "atoll_bf16": "atoll fetch, bf16 (effective)",
    "atoll_int8": "atoll fetch, int8 blockwise (effective)",
    "atoll_topk1": "atoll fetch, top-k 1% (effective)",
}
RAW_CHUNK = 4 * 1024 * 1024
HIVEMIND_CHUNK = 2 * 1024 * 1024
_RAW_METHOD = "/atoll.bench.Raw/Stream"


def make_state_dict(megabytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 MLP-shaped tensors totalling `megabytes` MiB (within one layer's size)."""
    g = torch.Generator().manual_seed(seed)
    layer = 1024 * 1024  # elements per weight matrix (4 MiB)
    total = megabytes * 1024 * 1024 // 4
    sd, i = {}, 0
    while total > 0:
        n = min(layer, total)
        rows = max(1, n // 1024)
        sd[f"layers.{i:03d}.weight"] = torch.randn(rows, n // rows, generator=g)
        total -= rows * (n // rows)
        if total >= 1024:
            sd[f"layers.{i:03d}.bias"] = torch.randn(1024, generator=g)
            total -= 1024
        i += 1
        if total < 1024:
            break
    return sd


# -- server process ----------------------------------------------------------------------------
def _serve(sizes: list[int], conn, workdir: str) -> None:
    """Runs in a spawned process: atoll server (gRPC and libp2p), raw gRPC server and a hivemind P2P peer."""
    import grpc
    from hivemind.compression import serialize_torch_tensor
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming

    from p2pd.codecs import Codec
    from p2pd.server import MAX_MESSAGE_BYTES, SnapshotStore, SwarmServer
    from p2pd.tensors import SnapshotKey

    store = SnapshotStore(keep=len(sizes) * (1 + len(CODED)))
    digests, dicts, encode_seconds = {}, {}, {}
    for mb in sizes:
        dicts[mb] = make_state_dict(mb)
        digests[mb] = store.publish(SnapshotKey("model", mb), dicts[mb]).hexdigest
        for step, (path, (name, ratio)) in enumerate(CODED.items(), start=1):
            t0 = time.perf_counter()
            coded = Codec(name, ratio).compress(dicts[mb])
            encode_seconds[f"{path}/{mb}"] = time.perf_counter() - t0
            digests[f"{path}/{mb}"] = store.publish(SnapshotKey("model", mb, step), coded).hexdigest
    discovery, plane = _libp2p_node(Path(workdir) / "server.key")  # its DHT forks: before any gRPC object
    atoll = SwarmServer(store, max_workers=4)
    atoll.start()
    plane.serve(atoll.servicer)

    # the baseline streams the same tensor bytes, pre-cut into 4 MiB messages
    raw_chunks = {}
    for mb, sd in dicts.items():
        raw_chunks[mb] = [
            mv[off : off + RAW_CHUNK].tobytes()
            for mv in (memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in sd.values())
            for off in range(0, mv.nbytes, RAW_CHUNK)
        ]

    def raw_stream(request: bytes, context):
        yield from raw_chunks[int(request.decode())]

    raw = grpc.server(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(4),
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    raw.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "atoll.bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(raw_stream)}
            )
        ]
    )
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    raw.start()

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def handler(request: runtime_pb2.ExpertUID, _context):
        for t in dicts[int(request.uid)].values():
            for part in split_for_streaming(serialize_torch_tensor(t), HIVEMIND_CHUNK):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def start_p2p():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        await p2p.add_protobuf_handler("bench", handler, runtime_pb2.ExpertUID, stream_output=True)
        return p2p, [str(m) for m in await p2p.get_visible_maddrs()]

    p2p, maddrs = asyncio.run_coroutine_threadsafe(start_p2p(), loop).result(60)
    conn.send(
        dict(
            atoll=atoll.address,
            raw=f"127.0.0.1:{raw_port}",
            maddrs=maddrs,
            peer_id=p2p.peer_id.to_base58(),
            plane_maddrs=discovery.visible_maddrs(),
            plane_peer_id=plane.peer_id,
            digests=digests,
            encode_seconds=encode_seconds,
        )
    )
    conn.recv()  # any message (or EOF) means stop
    plane.close()
    discovery.close()
    atoll.stop(0)
    raw.stop(0)
    asyncio.run_coroutine_threadsafe(p2p.shutdown(), loop).result(30)


def _libp2p_node(key: Path, initial_peers=()):
    """A DHT member with its own identity (its daemon's peer id) and the libp2p data plane on it."""
    from p2pd.discovery import Discovery
    from p2pd.identity import Identity
    from p2pd.libp2p import Libp2pPlane

    discovery = Discovery(Identity.load_or_create(key), swarm="bench", initial_peers=initial_peers).start()
    return discovery, Libp2pPlane(discovery.dht)


# -- client side -------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured transfer: path, size in MiB, best seconds, throughput (GB/s of float32
    model state), bytes on the wire, and for a coded path the publisher's encoding seconds."""

    size_mb: int
    path: str
    seconds: float
    gbps: float
    ratio_to_grpc_raw: float | None = None
    wire_bytes: int = 0
    encode_seconds: float | None = None


def _time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(sizes: list[int], repeats: int = 3, paths: tuple[str, ...] = PATHS, progress=None) -> list[Row]:
    """Every path at every size, `repeats` times each; one Row per transfer."""
    import tempfile

    import grpc
    from hivemind.compression import deserialize_tensor_stream
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2

    from p2pd.client import SwarmClient
    from p2pd.server import MAX_MESSAGE_BYTES
    from p2pd.tensors import SnapshotKey

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    workdir = tempfile.TemporaryDirectory(prefix="atoll-bench-")
    # not a daemon process: its DHT starts a process of its own; stopped below in any case
    proc = ctx.Process(target=_serve, args=(sizes, child, workdir.name))
    proc.start()
    child.close()  # the server's end only: a server that dies then reads as EOF here
    rows: list[Row] = []
    loop = asyncio.new_event_loop()
    p2p = discovery = plane = None
    try:
        if not parent.poll(300):
            raise RuntimeError("benchmark server did not start within 300 s")
        try:
            info = parent.recv()
        except EOFError:
            raise RuntimeError(f"benchmark server exited with {proc.exitcode} before it started") from None
        if "atoll_libp2p" in paths:  # its DHT forks: before any gRPC object
            discovery, plane = _libp2p_node(Path(workdir.name) / "client.key", info["plane_maddrs"])
            over_libp2p = plane.client(info["plane_peer_id"], identity=discovery.identity)
        client = SwarmClient(info["atoll"], timeout=300)
        raw_channel = grpc.insecure_channel(info["raw"], [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        raw_call = raw_channel.unary_stream(_RAW_METHOD)
        if "hivemind" in paths:
            p2p = loop.run_until_complete(
                P2P.create(initial_peers=info["maddrs"], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            )
            server_id = PeerID.from_base58(info["peer_id"])

        for mb in sizes:
            local = make_state_dict(mb)
            nbytes = sum(t.numel() * t.element_size() for t in local.values())
            digest = bytes.fromhex(info["digests"][mb])

            dst = {k: torch.zeros_like(v) for k, v in local.items()}

            def do_copy():  # into memory already faulted in: the bandwidth ceiling
                for k, v in local.items():
                    dst[k].copy_(v)

            def do_raw():
                got = sum(len(chunk) for chunk in raw_call(str(mb).encode(), timeout=600))
                assert got == nbytes, (got, nbytes)

            def do_atoll():
                snap = client.fetch(SnapshotKey("model", mb), expected_digest=digest)
                assert snap.nbytes == nbytes

            buffers = {k: torch.zeros_like(v) for k, v in local.items()}  # faulted in, as a live node's are

            def do_atoll_reuse():
                snap = client.fetch(SnapshotKey("model", mb), expected_digest=digest, into=buffers)
                assert snap.nbytes == nbytes

            def do_atoll_libp2p():
                snap = over_libp2p.fetch(SnapshotKey("model", mb), expected_digest=digest, timeout=300)
                assert snap.nbytes == nbytes

            async def _hm():
                stream = await p2p.iterate_protobuf_handler(
                    server_id, "bench", runtime_pb2.ExpertUID(uid=str(mb)), runtime_pb2.ExpertResponse
                )
                tensors = await deserialize_tensor_stream(msg.tensors async for msg in stream)
                assert sum(t.numel() * t.element_size() for t in tensors) == nbytes

            def do_hivemind():
                loop.run_until_complete(_hm())

            fns = dict(
                copy=do_copy,
                grpc_raw=do_raw,
                atoll=do_atoll,
                atoll_reuse=do_atoll_reuse,
                atoll_libp2p=do_atoll_libp2p,
                hivemind=do_hivemind,
            )
            wire = {}
            for step, path in enumerate(CODED, start=1):

                def do_coded(step=step, path=path):
                    key, want = SnapshotKey("model", mb, step), bytes.fromhex(info["digests"][f"{path}/{mb}"])
                    snap = client.fetch(key, expected_digest=want)
                    assert sum(t.numel() * 4 for t in snap.tensors.values()) == nbytes
                    wire[path] = snap.nbytes

                fns[path] = do_coded
            for path in paths:
                secs = _time_best(fns[path], repeats)
                rows.append(
                    Row(
                        mb,
                        path,
                        secs,
                        nbytes / secs / 1e9,
                        wire_bytes=wire.get(path, nbytes if path != "copy" else 0),
                        encode_seconds=info["encode_seconds"].get(f"{path}/{mb}"),
                    )
                )
                if progress:
                    progress(rows[-1])
        client.close()
        raw_channel.close()
    finally:
        if p2p is not None:
            loop.run_until_complete(p2p.shutdown())
        loop.close()
        if plane is not None:
            plane.close()
        if discovery is not None:
            discovery.close()
        try:
            parent.send("stop")
        except (BrokenPipeError, OSError):
            pass
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        workdir.cleanup()
    base = {r.size_mb: r.gbps for r in rows if r.path == "grpc_raw"}
    for r in rows:
        if r.size_mb in base:
            r.ratio_to_grpc_raw = r.gbps / base[r.size_mb]
    return rows


def table(rows: list[Row]) -> str:
    """Medians over repeats per path and size as a markdown table."""
    lines = [
        "| size (MiB) | path | best seconds | GB/s (float32 state) | ratio to bare gRPC | MB on the wire | encode s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.ratio_to_grpc_raw:.2f}" if r.ratio_to_grpc_raw is not None else "-"
        enc = f"{r.encode_seconds:.3f}" if r.encode_seconds is not None else "-"
        lines.append(
            f"| {r.size_mb} | {r.path} | {r.seconds:.3f} | {r.gbps:.3f} | {ratio} | {r.wire_bytes / 1e6:.1f} | {enc} |"
        )
    return "\n".join(lines)


def write_outputs(rows: list[Row], out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and transport.png in `out`; returns their paths."""
    import matplotlib.ticker

    from node.app.bench import write_results
    from node.app.plotting import pyplot

    written = write_results(out, {"meta": meta, "rows": [asdict(r) for r in rows]}, table(rows))
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = sorted({r.size_mb for r in rows})
    for path in PATHS:
        ys = [next((r.gbps for r in rows if r.size_mb == s and r.path == path), None) for s in sizes]
        if any(y is not None for y in ys):
            ax.plot(sizes, ys, marker="o", label=LEGEND[path])
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sizes)
    ax.set_xlabel("state dict size (MiB)")
    ax.set_ylabel("throughput (GB/s, log)")
    ax.set_title("Snapshot exchange over loopback (best of runs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transport.png", dpi=120)
    plt.close(fig)
    written.append(out / "transport.png")
    return written

"""Calibration of the membership simulator against real hivemind DHT nodes (`atoll bench membership`).

`nodes` hivemind DHTNodes (each with its own go-libp2p daemon) on 127.0.0.1 run in one asyncio loop in a child
process, with atoll's record validator. One node stores R signed tickets as subkeys of one key (today's single swarm
key, or one bucket of the directory); another reads the key as a daemon does (`get(latest=True)`). Every DHT call's
request and reply sizes are counted where they are served (DHTProtocol.rpc_find, rpc_store), so the figures are what
crossed the wire between DHT nodes (protobuf bytes; libp2p framing and encryption add a little). Reported per R: bytes
per read, the busiest DHT node's bytes per read, seconds per read, and whether the read failed (p2pd refuses replies
over 4 MiB). A per-node key (one ticket) is read the same way.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import os
import signal
import statistics
import time


def _tickets(n: int, swarm: str) -> list[tuple[str, bytes]]:
    """n (peer id, signed record envelope) pairs of distinct fresh identities, records like a daemon's."""
    from hivemind.utils import get_dht_time

    from node.app.bench.membership_costs import daemon_record
    from p2pd.identity import Identity

    idents = [Identity.generate() for _ in range(n)]
    return [(i.peer_id, daemon_record(i, get_dht_time(), ttl=600.0)) for i in idents]


async def _calibrate(rows: list[int], nodes: int, repeats: int, conn) -> None:
    from hivemind.dht.node import DHTNode
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.utils import get_dht_time

    from p2pd.dht import PeerRecordValidator  # also installs the row-by-row dictionary check

    served: collections.Counter = collections.Counter()  # id(protocol) -> bytes served
    calls: collections.Counter = collections.Counter()
    find, store = DHTProtocol.rpc_find, DHTProtocol.rpc_store

    async def rpc_find(self, request, context):
        reply = await find(self, request, context)
        served[id(self)] += request.ByteSize() + reply.ByteSize()
        calls["find"] += 1
        return reply

    async def rpc_store(self, request, context):
        reply = await store(self, request, context)
        served[id(self)] += request.ByteSize() + reply.ByteSize()
        calls["store"] += 1
        return reply

    from hivemind.p2p import P2PContext
    from hivemind.proto import dht_pb2

    # hivemind finds a handler's message types from its annotations
    rpc_find.__annotations__ = dict(request=dht_pb2.FindRequest, context=P2PContext, return_=dht_pb2.FindResponse)
    rpc_store.__annotations__ = dict(request=dht_pb2.StoreRequest, context=P2PContext, return_=dht_pb2.StoreResponse)
    for f in (rpc_find, rpc_store):
        f.__annotations__["return"] = f.__annotations__.pop("return_")
    DHTProtocol.rpc_find, DHTProtocol.rpc_store = rpc_find, rpc_store
    swarm = "calibration"
    # patient RPCs and a short blacklist: on a loaded machine a slow answer must not bar a node from the next reads
    kw = dict(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validator=PeerRecordValidator(swarm),
        cache_locally=False,
        wait_timeout=30,
        blacklist_time=0.5,
        backoff_rate=1.0,
    )
    dht = [await DHTNode.create(**kw)]
    peers = [str(m) for m in await dht[0].get_visible_maddrs()]
    for _ in range(nodes - 1):
        dht.append(await DHTNode.create(initial_peers=peers, **kw))
    # the reader holds no keys (client mode), as most of a large swarm's nodes hold none of a given key
    reader = await DHTNode.create(initial_peers=peers, client_mode=True, **kw)
    writer = dht[0]
    dht.append(reader)
    results = []
    try:
        # the per-node key first: a read that fails (over 4 MiB) gets the holders blacklisted for a while
        peer_key = f"atoll/{swarm}/peer/one"
        pid, env = _tickets(1, swarm)[0]
        await writer.store(peer_key, env, get_dht_time() + 600, subkey=pid)
        results.append(
            dict(await _reads(reader, peer_key, 1, repeats, served, calls, latest=False), kind="per-node key")
        )
        for r in rows:
            key = f"atoll/{swarm}/calibration-{r}"
            tickets = _tickets(r, swarm)
            exp = get_dht_time() + 600
            for a in range(0, r, 500):  # store_many in batches: one huge store would itself pass 4 MiB
                part = tickets[a : a + 500]
                await writer.store_many([key] * len(part), [t[1] for t in part], exp, subkeys=[t[0] for t in part])
            results.append(await _reads(reader, key, r, repeats, served, calls))
            conn.send(("progress", results[-1]))
        conn.send(("done", results))
    finally:
        for node in dht:
            await node.shutdown()


async def _reads(reader, key: str, rows: int, repeats: int, served, calls, latest: bool = True) -> dict:
    sizes, busiest, seconds, got, failed = [], [], [], [], 0
    for _ in range(repeats):
        served.clear()
        t0 = time.perf_counter()
        try:
            found = await asyncio.wait_for(reader.get(key, latest=latest), timeout=60)
        except Exception:
            found = None
        seconds.append(time.perf_counter() - t0)
        n = len(found.value) if found is not None and isinstance(found.value, dict) else 0
        failed += n < rows
        got.append(n)
        sizes.append(sum(served.values()))
        busiest.append(max(served.values(), default=0))
    return dict(
        kind="one key",
        rows=rows,
        bytes_per_read=statistics.median(sizes),
        busiest_node_bytes_per_read=statistics.median(busiest),
        seconds_per_read=statistics.median(seconds),
        rows_read=statistics.median(got),
        failed_reads=failed,
        reads=repeats,
    )


def _child(rows, nodes, repeats, conn) -> None:
    os.setpgrp()  # the bench stops this process and its p2pd daemons as one group
    os.environ.setdefault("GOGC", "50")
    try:
        asyncio.run(_calibrate(rows, nodes, repeats, conn))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))


def calibrate(rows: list[int], nodes: int = 4, repeats: int = 3, timeout: float = 900.0, progress=None) -> list[dict]:
    """Run the calibration (see the module docstring) in a child process; returns one dict per row count and one for
    the per-node key. Raises RuntimeError when the DHT fails to start or the run passes `timeout` seconds."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(rows, nodes, repeats, child), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if parent.poll(1.0):
                kind, payload = parent.recv()
                if kind == "done":
                    return payload
                if kind == "error":
                    raise RuntimeError(f"DHT calibration failed: {payload}")
                if progress:
                    progress(payload)
            elif not proc.is_alive():
                raise RuntimeError("the DHT calibration process died")
        raise RuntimeError(f"the DHT calibration took more than {timeout:.0f} s")
    finally:
        if proc.pid is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child and the p2pd daemons it started
            except (ProcessLookupError, PermissionError):
                pass
        proc.join(timeout=10)

"""torchft's DiLoCo on atoll's workers: a baseline for atoll's benchmarks.

Runs inside the torchft virtual environment (node/app/bench/torchft_env.py: torchft, torch,
numpy, pydantic, pyyaml, blake3), with atoll's source folder on PYTHONPATH; atoll's own
environment never gets torchft. One Lighthouse (`torchft_env.lighthouse_command`) and one
replica group of one process per node:

    torchft_lighthouse --min_replicas 3 --bind 127.0.0.1:PORT --join_timeout_ms 5000 --quorum_tick_ms 100
    python -m node.app.bench.torchft_app replica --lighthouse http://127.0.0.1:PORT \
        --config node0.json --replica-id 0 --nodes 3 --host 127.0.0.1 --threads 1

Each replica is a `node.protocol.worker.Worker` built from the NodeConfig an atoll node gets, so
model, init, partition, sampler, inner optimizer and its step-size schedule are atoll's: the
inner steps are the worker's own `train(r)`, one outer step (round) per `train.local_steps`
inner steps, `train.rounds` of them. `torchft.local_sgd.DiLoCo` hooks the inner optimizer's
`step()`: every H inner steps it all-reduces the pseudo-gradient (global minus local
parameters, averaged over the quorum) and applies it with the outer optimizer, Nesterov SGD
(lr 0.7, momentum 0.9 as in the DiLoCo paper). With `--fragments F` it is Streaming DiLoCo: the
trainable parameters are cut into F contiguous fragments of about equal size, one synced
every H / F inner steps, its all-reduce started `--sync-delay` steps before it is applied.

The replica prints atoll's JSON events on stdout: `round` after every outer step (rounds done,
the worker's metric every `--eval-every` rounds and on the last, else null, under its name and as
`score`; the mean inner loss; since the start, as atoll's events: `compute_s`, seconds outside
DiLoCo's sync, `comm_s`, seconds inside it (quorum, all-reduce, outer step), `idle_s`, evaluation,
and `utilization`; `sent_bytes` and `received_bytes`, cumulative) and `done` (the final
figures and `digest`, sha256 of the trainable parameters as float32 bytes in name order: equal on
every replica with one fragment; with several, the fragments synced before the last have taken local
steps since). gloo counts no bytes, so they are COMPUTED, not measured: a
ring all-reduce moves 2 (N - 1) / N times the fragment's bytes each way per sync (N: replicas in
the quorum); quorum and heartbeat messages are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds the IPv4 `address` (e.g. `lo` for 127.0.0.1),
    None where no interface holds it or `address` is not IPv4 (Linux only: ioctl SIOCGIFADDR)."""
    import fcntl
    import struct

    try:
        socket.inet_aton(address)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def fragments_of(model, count: int) -> list:
    """`count` modules over disjoint contiguous runs of `model`'s trainable parameters (in
    named_parameters order) of about equal element counts: the fragments of Streaming DiLoCo.
    Each holds the model's own Parameter objects (names with `.` replaced by `__`). Raises
    ValueError when `count` is below 1 or above the number of trainable parameters."""
    from torch import nn

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not 1 <= count <= len(named):
        raise ValueError(f"fragments must be between 1 and {len(named)} (the trainable tensors), got {count}")
    total = sum(p.numel() for _, p in named)
    groups: list[list] = [[] for _ in range(count)]
    g, seen = 0, 0
    for k, (name, p) in enumerate(named):
        # the next fragment once this one holds its share, or when each later one needs a tensor left
        if groups[g] and g < count - 1 and (seen >= total * (g + 1) / count or len(named) - k == count - 1 - g):
            g += 1
        groups[g].append((name, p))
        seen += p.numel()
    out = []
    for group in groups:
        frag = nn.Module()
        for name, p in group:
            frag.register_parameter(name.replace(".", "__"), p)
        out.append(frag)
    return out


def digest(model) -> str:
    """sha256 (hex) of `model`'s trainable parameters as float32 bytes, in named_parameters order."""
    import torch

    h = hashlib.sha256()
    for _, p in model.named_parameters():
        if p.requires_grad:
            h.update(p.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _checkpoint_transport(host: str, timeout: timedelta):
    """torchft's HTTP checkpoint transport (a replica that heals fetches the model from a peer)
    advertising `host` instead of socket.gethostname(), which other network namespaces cannot
    resolve; its server listens on every address."""
    from torchft.checkpointing.http_transport import HTTPTransport

    class HostTransport(HTTPTransport):
        def address(self) -> str:
            port = self._server.socket.getsockname()[1]
            name = f"[{host}]" if ":" in host else host
            return f"http://{name}:{port}/checkpoint/"

    return HostTransport(timeout=timeout, num_chunks=0)


def replica(a: argparse.Namespace) -> None:
    """One replica group of one process: the worker of `a.config` trained with DiLoCo (module docstring)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        # gloo binds to the address the hostname resolves to, else to loopback: neither reaches
        # another network namespace, so the interface of --host is named explicitly
        ifname = interface_of(a.host)
        if ifname is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    import torch
    from torch.distributed import TCPStore
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    from node.config import NodeConfig
    from node.protocol.worker import Worker

    torch.set_num_threads(a.threads)
    with open(a.config) as f:
        cfg = NodeConfig.model_validate(json.load(f))
    steps, rounds = cfg.train.local_steps, cfg.train.rounds
    if steps is None:
        raise SystemExit("torchft_app: DiLoCo needs train.local_steps (not local_seconds)")
    if steps % a.fragments or a.sync_delay >= steps // a.fragments:
        raise SystemExit(
            f"torchft_app: train.local_steps ({steps}) must be a multiple of --fragments ({a.fragments}) "
            f"and --sync-delay ({a.sync_delay}) below local_steps / fragments"
        )
    worker = Worker(cfg)
    model, inner = worker.model, worker.optimizer
    timeout = timedelta(seconds=a.timeout)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    store = TCPStore(a.host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=a.nodes,
        use_async_quorum=False,  # DiLoCo refuses the asynchronous quorum
        replica_id=f"atoll_replica_{a.replica_id}",
        store_addr=a.host,
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=a.lighthouse,
        hostname=a.host,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=a.quorum_timeout),
        connect_timeout=timeout,
        init_sync=False,  # every worker starts from the same seeded init
        checkpoint_transport=_checkpoint_transport(a.host, timeout),
    )
    fragments = fragments_of(model, a.fragments)
    outer = [
        torch.optim.SGD(frag.parameters(), lr=a.outer_lr, momentum=a.outer_momentum, nesterov=True)
        for frag in fragments
    ]
    frag_bytes = [sum(p.numel() * p.element_size() for p in frag.parameters()) for frag in fragments]
    moved = {"sent": 0.0, "received": 0.0, "syncs": 0, "commits": 0, "comm_s": 0.0}
    diloco = DiLoCo(
        manager,
        fragments,
        inner,
        outer,
        sync_every=steps,
        fragment_sync_delay=a.sync_delay,
        fragment_update_alpha=a.alpha,
        should_quantize=False,
    )
    post_hook = diloco._step_post_hook  # bound before __enter__ registers it: time every sync

    def timed_post_hook(*args) -> None:
        t = time.perf_counter()
        try:
            post_hook(*args)
        finally:
            moved["comm_s"] += time.perf_counter() - t

    diloco._step_post_hook = timed_post_hook
    for k, frag in enumerate(diloco._fragments):
        perform = frag.perform_sync

        def counted(perform=perform, k=k) -> bool:
            n = max(1, manager.num_participants())
            way = 2 * (n - 1) / n * frag_bytes[k]  # ring all-reduce, computed
            moved["sent"] += way
            moved["received"] += way
            moved["syncs"] += 1
            ok = perform()
            moved["commits"] += int(ok)
            return ok

        frag.perform_sync = counted

    def figures() -> dict:
        return dict(sent_bytes=round(moved["sent"]), received_bytes=round(moved["received"]))

    metric, value, walls = worker.metric, None, []
    spent = {"compute": 0.0, "comm": 0.0, "idle": 0.0}  # cumulative, as atoll's events (node/protocol/timing.py)

    def split() -> dict:
        wall = sum(spent.values())
        return dict(
            compute_s=round(spent["compute"], 4),
            comm_s=round(spent["comm"], 4),
            idle_s=round(spent["idle"], 4),
            utilization=round(spent["compute"] / wall, 4) if wall > 0 else 0.0,
        )

    def score(v) -> dict:  # the metric under its own name and as atoll's `score`
        v = None if v is None else round(v, 5)
        return {metric: v, "metric": metric, "score": v}

    t_start = time.perf_counter()
    try:
        with diloco:
            for r in range(rounds):
                comm0, t0 = moved["comm_s"], time.perf_counter()
                stats = worker.train(r)
                wall = time.perf_counter() - t0
                walls.append(wall)
                comm = moved["comm_s"] - comm0
                spent["compute"] += wall - comm
                spent["comm"] += comm
                last = r == rounds - 1
                t1 = time.perf_counter()
                value = worker.evaluate() if last or (r + 1) % a.eval_every == 0 else None
                spent["idle"] += time.perf_counter() - t1
                _emit(event="round", round=r + 1, **score(value), loss=round(stats.loss, 5), **split(), **figures())
        _emit(
            event="done",
            round=rounds,
            **score(value),
            **figures(),
            **split(),
            syncs=moved["syncs"],
            commits=moved["commits"],
            median_round_s=round(statistics.median(walls), 4) if walls else None,
            wall_s=round(time.perf_counter() - t_start, 3),
            replicas=manager.num_participants(),
            digest=digest(model),
        )
    finally:
        manager.shutdown(wait=False)


def main(argv: list[str]) -> None:
    """Command line: `replica` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="torchft_app")
    p.add_argument("role", choices=("replica",))
    p.add_argument("--lighthouse", required=True, help="http://HOST:PORT of torchft's Lighthouse")
    p.add_argument("--config", required=True, help="the node's NodeConfig as JSON")
    p.add_argument("--replica-id", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True, help="replicas a quorum needs")
    p.add_argument("--host", default="127.0.0.1", help="this replica's address, reachable from the others")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--fragments", type=int, default=1, help="Streaming DiLoCo fragments (1: DiLoCo)")
    p.add_argument("--sync-delay", type=int, default=0, help="inner steps an all-reduce overlaps (tau)")
    p.add_argument("--alpha", type=float, default=0.0, help="share of the local parameters kept at a sync")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many outer steps")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for an all-reduce, commit or connect")
    p.add_argument("--quorum-timeout", type=float, default=600.0, help="seconds to wait for a quorum")
    a = p.parse_args(argv)
    if a.eval_every < 1 or a.fragments < 1 or a.sync_delay < 0:
        p.error("--eval-every and --fragments must be >= 1, --sync-delay >= 0")
    replica(a)


if __name__ == "__main__":
    main(sys.argv[1:])

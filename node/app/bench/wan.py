"""Swarms on constrained links: atoll's daemons on a testbed of network namespaces (node/app/testbed/), and the
simulator's link model predicting the same runs.

`run_atoll` starts one `atoll node start` per testbed host (real DHT, gRPC, signed records, metrics), node i on
host i with that host's address, and reads every node's round and done events: where its time went (compute,
communication while not computing, idle: node/protocol/timing.py), the bytes it moved, and its metric over time.

`predict` runs the same swarm file through the simulator with traces (node/protocol/sim.py) and replays them on
the testbed's links (node/algo/comm/links.py), with each node's local step and between-round gap costing what the
daemon measured for itself: the model then predicts the communication, which is what it is for. `compare` sets
the prediction beside the measurement, node by node.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.app.bench import worst_curve
from node.app.swarm import NodeRun, run_swarm
from node.app.testbed.profiles import HostLink
from node.app.testbed.testbed import Testbed
from node.config import SwarmConfig


@dataclass
class NodeTime:
    """One node of one run: seconds of `compute`, `comm` and `idle` (their sum: `wall`), `utilization`, MB it sent
    and received, its final metric, and the local steps it took."""

    index: int
    compute: float
    comm: float
    idle: float
    utilization: float
    sent_mb: float
    received_mb: float
    final: float | None
    steps: int
    rounds: int

    @property
    def wall(self) -> float:
        """compute + comm + idle: seconds from its first round to its end."""
        return self.compute + self.comm + self.idle


@dataclass
class WanRun:
    """One run of one system and method on the testbed: per-node times, seconds from launch to every node at the
    target (None: never), launch to the last node's end, the worst node's final metric, and the curve of the worst
    node's metric over seconds since launch."""

    system: str
    method: str
    repeat: int
    nodes: list[NodeTime]
    to_target_s: float | None = None
    wall_s: float = 0.0
    worst_final: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready, with each node's wall time."""
        d = asdict(self)
        for n, node in zip(d["nodes"], self.nodes):
            n["wall"] = round(node.wall, 3)
        return d

    @property
    def utilization(self) -> float:
        """The median node's compute utilization."""
        return statistics.median(n.utilization for n in self.nodes)

    @property
    def mb_per_node(self) -> float:
        """MB sent plus received, averaged over the nodes."""
        return statistics.fmean(n.sent_mb + n.received_mb for n in self.nodes)


def testbed_swarm(base: SwarmConfig, bed: Testbed) -> SwarmConfig:
    """`base` with node i on testbed host i: its gRPC server, metrics and DHT on that host's address. Raises
    ValueError when the swarm has more nodes than the testbed has hosts."""
    if base.nodes > len(bed.addresses):
        raise ValueError(f"{base.nodes} nodes need {base.nodes} testbed hosts, the testbed has {len(bed.addresses)}")
    per_node = {i: dict(base.per_node.get(i, {})) for i in range(base.nodes)}
    for i, own in per_node.items():
        own["net.host"] = bed.addresses[i]
        own["net.dht_listen"] = [f"/ip4/{bed.addresses[i]}/tcp/0"]
    return base.model_copy(update={"per_node": per_node})


def node_time(run: NodeRun, local_steps: int) -> NodeTime:
    """A node's figures from its done event; its rounds are its round events, `local_steps` each."""
    done = run.final or {}
    return NodeTime(
        index=run.index,
        compute=float(done.get("compute_s", 0.0)),
        comm=float(done.get("comm_s", 0.0)),
        idle=float(done.get("idle_s", 0.0)),
        utilization=float(done.get("utilization", 0.0)),
        sent_mb=done.get("sent_bytes", 0) / 1e6,
        received_mb=done.get("received_bytes", 0) / 1e6,
        final=done.get("score"),
        steps=len(run.rounds) * local_steps,
        rounds=len(run.rounds),
    )


def summarize(
    system: str, method: str, repeat: int, runs: list[NodeRun], t0: float, t_end: float, target, cfg, lower: bool
) -> WanRun:
    """One run's figures from its nodes' events (`_t`: time.monotonic() when read; `t0`: launch, `t_end`: the last
    node's end), node i's steps from `cfg` (a SwarmConfig), the metric lower-is-better or not."""
    nodes = [node_time(r, cfg.config_for(r.index).train.local_steps) for r in runs]
    events = [(e["_t"] - t0, r.index, e["score"]) for r in runs for e in r.rounds if e.get("score") is not None]
    curve, reached = worst_curve(events, len(runs), lower, target)
    finals = [n.final for n in nodes if n.final is not None]
    worst = (max(finals) if lower else min(finals)) if finals else None
    return WanRun(system, method, repeat, nodes, reached, round(t_end - t0, 2), worst, curve)


def run_atoll(
    swarm_cfg: SwarmConfig, bed: Testbed, workdir: Path, method: str, repeat: int, target: float | None
) -> WanRun:
    """One atoll swarm on the testbed (see the module docstring). Raises RuntimeError or TimeoutError when a node
    fails or the swarm does not finish within `swarm_cfg.timeout`."""
    cfg = testbed_swarm(swarm_cfg, bed)
    t0 = time.monotonic()
    runs = run_swarm(cfg, workdir, lambda runs: None, wrap=lambda i, argv: bed.exec_argv(bed.host(i), argv))
    lower = not bool((runs[0].ready or {}).get("higher_is_better", True))
    return summarize("atoll", method, repeat, runs, t0, time.monotonic(), target, swarm_cfg, lower)


def predict(
    swarm_cfg: SwarmConfig, links: list[HostLink], efficiency: float, step_seconds: list[float], idle: list[float]
) -> list:
    """Per node, the link model's Spent (compute, comm, idle, end) for `swarm_cfg` on `links` (node i on
    links[i]) run at `efficiency` of their configured rates (the goodput a lone TCP transfer reaches), with node i's
    local step costing step_seconds[i] and each gap between its rounds idle[i] seconds."""
    from node.algo.comm.links import replay
    from node.protocol.sim import Simulation

    sim = Simulation(swarm_cfg, traces=True)
    traces = sim.run().traces
    ids = sim.ids
    up = {p: links[i].up_bytes_per_s * efficiency for i, p in enumerate(ids)}
    down = {p: links[i].down_bytes_per_s * efficiency for i, p in enumerate(ids)}
    spent = replay(
        traces, up, down, {p: step_seconds[i] for i, p in enumerate(ids)}, {p: idle[i] for i, p in enumerate(ids)}
    )
    return [spent[p] for p in ids]


def compare(swarm_cfg: SwarmConfig, links: list[HostLink], efficiency: float, run: WanRun) -> list[dict]:
    """The link model's prediction beside `run`'s measurement, node by node: wall seconds and utilization, each
    with the relative error (predicted / measured - 1)."""
    steps = [max(n.steps, 1) for n in run.nodes]
    step_seconds = [n.compute / s for n, s in zip(run.nodes, steps)]
    idle = [n.idle / max(n.rounds, 1) for n in run.nodes]
    predicted = predict(swarm_cfg, links, efficiency, step_seconds, idle)
    rows = []
    for n, p in zip(run.nodes, predicted):
        rows.append(
            dict(
                node=n.index,
                up_mbit=links[n.index].up_mbit,
                down_mbit=links[n.index].down_mbit,
                measured_wall_s=round(n.wall, 2),
                predicted_wall_s=round(p.end, 2),
                wall_error=round(p.end / n.wall - 1, 4) if n.wall else None,
                measured_utilization=round(n.utilization, 4),
                predicted_utilization=round(p.utilization, 4),
                utilization_error=round(p.utilization / n.utilization - 1, 4) if n.utilization else None,
                measured_comm_s=round(n.comm, 2),
                predicted_comm_s=round(p.comm, 2),
            )
        )
    return rows

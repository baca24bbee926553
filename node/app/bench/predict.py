"""`atoll bench predict`: wall time, compute utilization and time to a target for swarms too large for a testbed,
from the simulator and the link model (node/algo/comm/links.py), with no wall clock deciding anything.

For each swarm size the simulator runs the swarm file's nodes (the same round engine as the daemons) and records
what every node did; the link model replays it on the profile's links (its host classes repeated to the swarm's
size), a local step costing `step_seconds` (measured here for the workload, one intra-op thread, unless given) and
each gap between rounds `idle_seconds`. The simulator's accuracies per round and the replayed round end times give
the time until every node is at the target. The link model was checked against the testbed for the same
configuration (docs/benchmarks/wan/); it has no latency and no per-message overhead.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from node.app.testbed.profiles import hosts
from node.config import SwarmConfig


@dataclass
class Prediction:
    """One swarm size: predicted seconds (median and slowest node), median utilization, seconds until every node
    is at the target (None: never), MB per node, the simulator's final worst and mean metric, and how long the
    simulation itself took (wall seconds on this machine)."""

    nodes: int
    wall_median_s: float
    wall_max_s: float
    utilization: float
    to_target_s: float | None
    mb_per_node: float
    worst_final: float
    mean_final: float
    simulated_in_s: float


def measured_step_seconds(cfg: SwarmConfig, steps: int = 10) -> float:
    """Seconds of one local step of node 0's workload on this machine, one intra-op thread (the median of
    `steps` after one warm-up round)."""
    import torch

    from node.protocol.worker import Worker

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = cfg.config_for(0)
        c.train.local_steps, c.train.local_seconds = 1, None
        worker = Worker(c)
        worker.train(0)
        times = [worker.train(r + 1).seconds for r in range(steps)]
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def predict(
    cfg: SwarmConfig, nodes: int, profile: str, step_seconds: float, idle_seconds: float, target: float
) -> Prediction:
    """The prediction for `cfg` at `nodes` nodes on `profile` (see the module docstring); `target` is an accuracy
    every honest node must reach (higher is better)."""
    from node.algo.comm.links import replay
    from node.protocol.sim import Simulation

    sized = cfg.model_copy(update={"nodes": nodes})
    t0 = time.perf_counter()
    sim = Simulation(sized, traces=True)
    res = sim.run()
    took = time.perf_counter() - t0
    links = hosts(profile, nodes)
    up = {p: links[i].up_bytes_per_s for i, p in enumerate(sim.ids)}
    down = {p: links[i].down_bytes_per_s for i, p in enumerate(sim.ids)}
    spent = replay(res.traces, up, down, {p: step_seconds for p in sim.ids}, {p: idle_seconds for p in sim.ids})
    ends = [s.end for s in spent.values()]
    reached = next((log.round for log in res.log if log.accuracy_min >= target), None)
    to_target = max(s.round_ends[reached - 1] for s in spent.values()) if reached else None
    return Prediction(
        nodes=nodes,
        wall_median_s=round(statistics.median(ends), 2),
        wall_max_s=round(max(ends), 2),
        utilization=round(statistics.median(s.utilization for s in spent.values()), 4),
        to_target_s=None if to_target is None else round(to_target, 2),
        mb_per_node=round(res.bytes_sent * 2 / nodes / 1e6, 2),  # each byte is sent by one node, received by one
        worst_final=round(min(res.final_accuracies), 4),
        mean_final=round(statistics.fmean(res.final_accuracies), 4),
        simulated_in_s=round(took, 1),
    )


def table(rows: list[Prediction], profile: str, step_seconds: float, target: float) -> str:
    """The predictions as a Markdown table."""
    lines = [
        f"profile {profile}; a local step costs {step_seconds * 1000:.1f} ms; target accuracy {target}",
        "",
        "| nodes | wall, median / slowest node (s) | compute utilization | to target on every node (s) | "
        "MB per node | accuracy, worst / mean | simulated in (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        to = "—" if r.to_target_s is None else f"{r.to_target_s:.1f}"
        lines.append(
            f"| {r.nodes} | {r.wall_median_s:.1f} / {r.wall_max_s:.1f} | {r.utilization:.1%} | {to} | "
            f"{r.mb_per_node:.1f} | {r.worst_final:.3f} / {r.mean_final:.3f} | {r.simulated_in_s:.0f} |"
        )
    return "\n".join(lines)


def write_outputs(rows: list[Prediction], out: Path, meta: dict, text: str) -> list[Path]:
    """results.json and table.md."""
    from node.app.bench import write_results

    return write_results(out, {"meta": meta, "rows": [asdict(r) for r in rows]}, text)

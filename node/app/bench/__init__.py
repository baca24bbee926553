"""Benchmarks behind `atoll bench ...`: each writes results.json, table.md and a plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def fresh_dir(path: Path) -> Path:
    """`path` as an empty directory, made anew: a benchmark's run starts from nothing (nodes that found the
    checkpoints of an earlier, interrupted run in their folders would resume it instead of training). Raises
    OSError."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_results(out: Path, payload: dict, table_md: str) -> list[Path]:
    """results.json and table.md in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.md").write_text(table_md + "\n")
    return [out / "results.json", out / "table.md"]


def worst_curve(events: list[tuple[float, int, float]], nodes: int, lower_is_better: bool, target: float | None):
    """(curve of the worst node's latest metric over time, seconds until every node is at `target`, None if never)
    from (seconds since launch, node index, metric) events of `nodes` nodes; times rounded to ms (the curve) and
    10 ms (the target)."""
    latest: dict[int, float] = {}
    curve, reached = [], None
    for t, i, value in sorted(events):
        latest[i] = value
        if len(latest) == nodes:
            worst = max(latest.values()) if lower_is_better else min(latest.values())
            curve.append((round(t, 3), worst))
            ok = target is not None and (worst <= target if lower_is_better else worst >= target)
            if reached is None and ok:
                reached = round(t, 2)
    return curve, reached


# What every simulated benchmark node runs unless a method says otherwise (nested NodeConfig
# fields): a small MLP with SGD + momentum, one intra-op thread (the simulator runs the nodes
# in parallel instead).
BENCH_NODE = {
    "threads": 1,
    "model": {"family": "mlp", "width": 64},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "train": {"rounds": 20, "local_steps": 10},
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.1},
    "comm": {"topology": "ring"},
}


def merged(base: dict, over: dict) -> dict:
    """`base` with the nested `over` laid on top (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def simulate(nodes: int, node: dict, seed: int, per_node: dict | None = None, faults=None, eval_every: int = 1):
    """One simulation of `nodes` virtual nodes running `node` (nested NodeConfig overrides of
    BENCH_NODE) with `seed` as train.seed and data.seed; `per_node`: index -> dotted overrides.
    Returns node.protocol.sim.SimResult; raises ConfigError for an invalid config."""
    from node.config import NodeConfig, SwarmConfig
    from node.protocol.sim import Simulation

    tree = merged(merged(BENCH_NODE, node), {"train": {"seed": seed}, "data": {"seed": seed}})
    swarm = SwarmConfig(nodes=nodes, node=NodeConfig.model_validate(tree), per_node=per_node or {})
    return Simulation(swarm, faults, eval_every=eval_every).run()

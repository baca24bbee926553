"""`atoll bench distill`: federated distillation on a mixed-architecture swarm, in the simulator.

8 nodes (by default) cycle through the architectures; every method gets the same local
steps per round. Methods: isolated local training; EdgeFD, KnFu and both combined
(exchange logits on the proxy set); model gossip, which can only mix models of one
architecture, so each architecture group gossips on its own; centralized training of each
architecture on all the data; FedD2S (personalized: deep-to-shallow layer dropping) at
several dropping rates. The table gives per-architecture accuracy (mean over that
architecture's nodes and the seeds), the mean over all nodes with its spread over seeds, and
bytes per round (all nodes). With `data.personal_holdout` (the CLI holds out 20% of each
node's share) also each node's accuracy on its *own* distribution: the mean, the worst node,
and the spread across nodes (std, the fairness FedD2S claims to improve).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from node.app.bench import algorithms

ARCHITECTURES = ("mlp:64", "mlp:256", "cnn:32")


def methods(rounds: int, architectures: list[str]) -> dict[str, dict]:
    """name -> spec (see node.app.bench.algorithms.methods)."""

    def fd(method: str) -> dict:
        node = {"comm": {"exchange": "logits"}, "distill": {"method": method}}
        return {"node": node, "architectures": list(architectures)}

    def d2s(rate: float) -> dict:
        spec = fd("fedd2s")
        spec["node"]["distill"]["drop_rate"] = rate
        return spec

    table = {
        "isolated": {"node": {"comm": {"gossip_budget": 0}}, "architectures": list(architectures)},
        "edgefd": fd("edgefd"),
        "knfu": fd("knfu"),
        "edgefd+knfu": fd("edgefd+knfu"),
        "fedd2s": d2s(0.1),
        "fedd2s_drop0": d2s(0.0),
        "fedd2s_drop0.05": d2s(0.05),
        "fedd2s_drop0.2": d2s(0.2),
        "gossip_same_arch": {
            "node": {"comm": {"gossip_budget": rounds}},
            "architectures": list(architectures),
            "swarm_per_architecture": True,
        },
    }
    for a in architectures:  # references, not methods: the data pooled; FedAvg if all ran `a`
        family, width = a.split(":")
        model = {"model": {"family": family, "width": int(width)}}
        table[f"centralized_{a}"] = {"baseline": "centralized", "node": model}
        table[f"fedavg_{a}"] = {"baseline": "fedavg", "node": model}
    return table


def _architectures(spec: dict) -> list[str]:
    if spec.get("architectures"):
        return spec["architectures"]
    m = spec["node"]["model"]
    return [f"{m['family']}:{m['width']}"]


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: accuracy per architecture and over all nodes (std over seeds), KB per round, seconds."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        archs = _architectures(rs[0]["spec"])
        per_arch = {}
        for a in dict.fromkeys(archs):
            accs = [acc for r in rs for i, acc in enumerate(r["final_accuracies"]) if archs[i % len(archs)] == a]
            per_arch[a] = statistics.fmean(accs)
        rounds = rs[0]["rounds"]
        means = [r["final_accuracy_mean"] for r in rs]
        own = [[a for a in r.get("own_accuracies") or () if a is not None] for r in rs]
        own = [o for o in own if o]
        out.append(
            dict(
                method=name,
                seeds=len(rs),
                per_architecture=per_arch,
                accuracy=statistics.fmean(means),
                accuracy_std=statistics.stdev(means) if len(means) > 1 else 0.0,
                own_accuracy=statistics.fmean(a for o in own for a in o) if own else None,
                own_worst=min(a for o in own for a in o) if own else None,
                own_spread=statistics.fmean(statistics.pstdev(o) for o in own) if own else None,
                kilobytes_per_round=statistics.fmean(r["bytes_sent"] for r in rs) / 1e3 / rounds,
                seconds=statistics.fmean(r["seconds"] for r in rs),
            )
        )
    return out


def table(summary: list[dict], architectures: list[str]) -> str:
    """The summary as a markdown table, one accuracy column per architecture."""
    gossip = next((s["kilobytes_per_round"] for s in summary if s["method"] == "gossip_same_arch"), None)
    head = (
        "| method | "
        + " | ".join(architectures)
        + " | all nodes (± std over seeds) | own distribution | own, worst node | own, spread across nodes"
        " | KB per round | vs model gossip bytes |"
    )
    lines = [head, "|---|" + "---:|" * (len(architectures) + 6)]
    for s in summary:
        accs = [f"{100 * s['per_architecture'][a]:.1f}" if a in s["per_architecture"] else "" for a in architectures]
        kb = s["kilobytes_per_round"]
        ratio = f"{gossip / kb:.0f}x fewer" if gossip and kb and s["method"] != "gossip_same_arch" else ""
        own = ["" if s.get(k) is None else f"{100 * s[k]:.1f}" for k in ("own_accuracy", "own_worst", "own_spread")]
        lines.append(
            f"| {s['method']} | "
            + " | ".join(accs)
            + f" | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} | "
            + " | ".join(own)
            + f" | {kb:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def run(
    nodes: int, base: dict, architectures: list[str], names: list[str], seeds: list[int], progress=None
) -> list[dict]:
    """Every named method over every seed; `base`: nested NodeConfig overrides."""
    table = methods(base["train"]["rounds"], architectures)
    return algorithms.run(nodes, base, names, seeds, progress, table=table)


def write_outputs(rows: list[dict], out: Path, meta: dict, architectures: list[str]) -> list[Path]:
    """results.json, table.md and accuracy.png in `out`; returns their paths."""
    summary = summarize(rows)
    return algorithms.write_outputs(rows, out, meta, summary, table(summary, architectures))

"""`atoll bench distill`: federated distillation on a mixed-architecture swarm, in the simulator.

8 nodes (by default) cycle through the architectures; every method gets the same local
steps per round. Methods: isolated local training; EdgeFD, KnFu and both combined
(exchange logits on the proxy set); model gossip, which can only mix models of one
architecture, so each architecture group gossips on its own; centralized training of each
architecture on all the data. The table gives per-architecture accuracy (mean over that
architecture's nodes and the seeds), the mean over all nodes with its spread over seeds, and
bytes per round (all nodes).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from node.bench import algorithms
from node.sim import SimConfig

ARCHITECTURES = ("mlp:64", "mlp:256", "cnn:32")


def methods(rounds: int, architectures: list[str]) -> dict[str, dict]:
    table = {
        "isolated": dict(method="isolated"),
        "edgefd": dict(method="edgefd"),
        "knfu": dict(method="knfu"),
        "edgefd+knfu": dict(method="edgefd+knfu"),
        "gossip_same_arch": dict(method="gossip", schedule="constant", gossip_budget=rounds),
    }
    for a in architectures:  # the data the nodes hold, pooled: a reference, not a method
        table[f"centralized_{a}"] = dict(method="centralized", architectures=[a])
    return table


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        archs = rs[0]["config"]["architectures"]
        per_arch = {}
        for a in dict.fromkeys(archs):
            accs = [acc for r in rs for i, acc in enumerate(r["final_accuracies"]) if archs[i % len(archs)] == a]
            per_arch[a] = statistics.fmean(accs)
        rounds = rs[0]["config"]["rounds"]
        means = [r["final_accuracy_mean"] for r in rs]
        out.append(
            dict(
                method=name,
                seeds=len(rs),
                per_architecture=per_arch,
                accuracy=statistics.fmean(means),
                accuracy_std=statistics.stdev(means) if len(means) > 1 else 0.0,
                kilobytes_per_round=statistics.fmean(r["bytes_sent"] for r in rs) / 1e3 / rounds,
                seconds=statistics.fmean(r["seconds"] for r in rs),
            )
        )
    return out


def table(summary: list[dict], architectures: list[str]) -> str:
    gossip = next((s["kilobytes_per_round"] for s in summary if s["method"] == "gossip_same_arch"), None)
    head = (
        "| method | "
        + " | ".join(architectures)
        + " | all nodes (± std over seeds) | KB per round | vs model gossip bytes |"
    )
    lines = [head, "|---|" + "---:|" * (len(architectures) + 3)]
    for s in summary:
        accs = [f"{100 * s['per_architecture'][a]:.1f}" if a in s["per_architecture"] else "" for a in architectures]
        kb = s["kilobytes_per_round"]
        ratio = f"{gossip / kb:.0f}x fewer" if gossip and kb and s["method"] != "gossip_same_arch" else ""
        lines.append(
            f"| {s['method']} | "
            + " | ".join(accs)
            + f" | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} | {kb:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def run(base: SimConfig, names: list[str], seeds: list[int], progress=None) -> list[dict]:
    return algorithms.run(base, names, seeds, progress, table=methods(base.rounds, base.architectures))


def write_outputs(rows: list[dict], out: Path, meta: dict, architectures: list[str]) -> list[Path]:
    summary = summarize(rows)
    return algorithms.write_outputs(rows, out, meta, summary, table(summary, architectures))

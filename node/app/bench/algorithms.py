"""`atoll bench algorithms`: every schedule and algorithm against the baselines, in the simulator.

Each method is a set of NodeConfig overrides run through the simulator (node/protocol/sim.py: the
daemons' own round engine) over several seeds with equal local compute (the same local steps
per node per round); `centralized` and `fedavg` are the references of node/app/bench/baselines.py.
The table gives mean and spread (std) of the final test accuracy over nodes and seeds, and
the bytes sent. Plots: accuracy against bytes sent and against rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from node.app.bench import baselines, merged, simulate, write_results
from node.app.plotting import pyplot
from node.protocol.exchange.memory import Faults

# FRL (node/algo/frl.py): nodes vote on edge rankings of a shared random network, wider than the
# others (supermasks need room: the weights never train) and with its own step size for scores
FRL_NODE = {
    "comm": {"exchange": "ranks", "final_merge": True},
    "model": {"width": 256},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
}


def methods(rounds: int, q: int = 4) -> dict[str, dict]:
    """name -> {"node": nested NodeConfig overrides} (or {"baseline": name}); "independent":
    every node its own initialisation seed; "unresponsive": the share of nodes whose snapshots
    are lost each round. Budgets are in gossip steps over the whole run."""
    third = max(1, rounds // 3)

    def gossip(**comm) -> dict:
        return {"node": {"comm": comm}}

    modest = {"algorithm": "modest", "modest_trainers": 8, "modest_aggregators": 2}
    return {
        "centralized": {"baseline": "centralized"},
        "fedavg": {"baseline": "fedavg"},
        "dpsgd": gossip(gossip_budget=rounds),
        f"mgs_q{q}": gossip(gossip_budget=q * rounds),
        f"dfedsam_mgs_q{q}": {"node": {"comm": {"gossip_budget": q * rounds}, "optim": {"sam_rho": 0.01}}},
        "late_merge": gossip(schedule="late", gossip_budget=third, final_merge=True),
        "constant_merge": gossip(schedule="constant", gossip_budget=third, final_merge=True),
        "modest_50": {"node": {"comm": modest}, "unresponsive": 0.5},
        "modest_80": {"node": {"comm": modest}, "unresponsive": 0.8},
        "indep_mean": {**gossip(gossip_budget=0, final_merge=True, merge="mean"), "independent": True},
        "indep_varcorr": {
            **gossip(gossip_budget=0, final_merge=True, merge="variance_corrected"),
            "independent": True,
        },
        "indep_dpsgd": {**gossip(gossip_budget=rounds), "independent": True},
        "indep_dpsgd_varcorr": {**gossip(gossip_budget=rounds, mix_variance_correction=True), "independent": True},
        "frl": {"node": FRL_NODE},
    }


def run_method(spec: dict, nodes: int, base: dict, seed: int):
    """One method of `methods` (a spec) on `nodes` nodes: node.protocol.sim.SimResult."""
    node = merged(base, spec.get("node", {}))
    if "baseline" in spec:
        return baselines.run(spec["baseline"], nodes, node, seed)
    faults = Faults().unresponsive(spec["unresponsive"], seed) if spec.get("unresponsive") else None
    return simulate(nodes, node, seed, per_node(spec, nodes, seed), faults)


def per_node(spec: dict, nodes: int, seed: int) -> dict[int, dict]:
    """The per-node overrides a spec asks for: "independent" (own init seeds), "architectures"
    (node i runs architectures[i % len], "family:width"; with "swarm_per_architecture" each
    architecture is a swarm of its own, as daemons that can only average their own kind) and
    "attackers" (the last ones run "attack"; sybils train on the first attacker's partition)."""
    out: dict[int, dict] = {i: {} for i in range(nodes)}
    archs = spec.get("architectures")
    for i, o in out.items():
        if spec.get("independent"):
            o["model.seed"] = seed * 100_003 + i + 1
        if archs:
            a = archs[i % len(archs)]
            family, width = a.split(":")
            o.update({"model.family": family, "model.width": int(width)})
            if spec.get("swarm_per_architecture"):
                o["net.swarm"] = f"atoll-{family}-{width}"
        first = nodes - spec.get("attackers", 0)
        if i >= first:
            o["security.attack"] = spec["attack"]
            if spec["attack"] == "sybil":
                o["security.attack_params"] = {"data_of": first}
    return {i: o for i, o in out.items() if o}


def run(
    nodes: int, base: dict, names: list[str], seeds: list[int], progress=None, table: dict[str, dict] | None = None
) -> list[dict]:
    """Every named method (specs from `table`, default `methods`) over every seed; `base`:
    nested NodeConfig overrides every method starts from (data set, partition, rounds...)."""
    rounds = base.get("train", {}).get("rounds", 20)
    table = table if table is not None else methods(rounds)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {', '.join(table)}")
    rows = []
    for name in names:
        for seed in seeds:
            res = run_method(table[name], nodes, base, seed)
            rows.append(
                dict(
                    method=name,
                    seed=seed,
                    alpha=base.get("data", {}).get("alpha"),
                    nodes=nodes,
                    rounds=rounds,
                    final_accuracy_mean=statistics.fmean(res.final_accuracies),
                    final_accuracy_min=min(res.final_accuracies),
                    final_accuracies=res.final_accuracies,
                    own_accuracies=[m.get("own_accuracy") for m in res.final_metrics],
                    bytes_sent=res.bytes_sent,
                    seconds=res.seconds,
                    log=[asdict(x) for x in res.log],
                    spec=table[name],
                )
            )
            if progress:
                progress(rows[-1])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: mean and std over seeds of the final accuracy, the worst node, MB sent and seconds."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        accs = [r["final_accuracy_mean"] for r in rs]
        out.append(
            dict(
                method=name,
                seeds=len(rs),
                accuracy=statistics.fmean(accs),
                accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                worst_node=min(r["final_accuracy_min"] for r in rs),
                megabytes=statistics.fmean(r["bytes_sent"] for r in rs) / 1e6,
                seconds=statistics.fmean(r["seconds"] for r in rs),
            )
        )
    return out


def table(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| method | seeds | accuracy (mean ± std) | worst node | MB sent | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['seeds']} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} | "
            f"{100 * s['worst_node']:.1f} | {s['megabytes']:.1f} | {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def write_outputs(
    rows: list[dict], out: Path, meta: dict, summary: list[dict] | None = None, table_md: str | None = None
) -> list[Path]:
    """results.json, table.md and accuracy.png (against rounds and against bytes)."""
    summary = summary if summary is not None else summarize(rows)
    written = write_results(
        out, {"meta": meta, "summary": summary, "runs": rows}, table_md if table_md is not None else table(summary)
    )
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    names = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.cm.tab20.colors
    for n_i, name in enumerate(names):
        style = dict(
            color=colors[(2 * n_i) % 20 if n_i < 10 else (2 * n_i + 1) % 20],
            linestyle=("-", "--", ":")[n_i % 3],
            label=name,
        )
        logs = [r["log"] for r in rows if r["method"] == name]
        n = min(len(lg) for lg in logs)
        acc = [statistics.fmean(lg[i]["accuracy_mean"] for lg in logs) for i in range(n)]
        mb = [statistics.fmean(lg[i]["bytes_sent"] for lg in logs) / 1e6 for i in range(n)]
        rounds = [logs[0][i]["round"] for i in range(n)]
        ax1.plot(rounds, acc, **style)
        if mb[-1] > 0:
            ax2.plot(mb, acc, **style)
    ax1.set_xlabel("round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax1.set_ylabel("mean test accuracy over nodes")
    ax2.set_xlabel("MB sent (all nodes, log scale)")
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax2.legend(*ax1.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(meta.get("title", "atoll bench algorithms"))
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    return [*written, out / "accuracy.png"]


def over_seeds(spec: dict, nodes: int, base: dict, seeds=(0, 1, 2)) -> tuple[float, float, float, list]:
    """(mean final accuracy, its std over seeds, mean MB sent, the last seed's log) of one
    spec: what the sweeps in docs/benchmarks/algorithms/ print."""
    runs = [run_method(spec, nodes, base, s) for s in seeds]
    accs = [statistics.fmean(r.final_accuracies) for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.fmean(accs), std, statistics.fmean(r.bytes_sent for r in runs) / 1e6, runs[-1].log

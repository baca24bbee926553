"""`atoll bench byzantine`: every attack against every aggregator, and a sybil run, in the simulator.

Main grid: `honest` honest nodes plus byzantine nodes making up at least `fraction` of the
swarm (16 + 6 = 27% by default), Dirichlet alpha 0.5, every attack of node/algo/security/attacks.py
against every aggregator of node/algo/aggregate/robust.py, plus the no-attack run of each
aggregator, and FRL (rank voting, `frl`) under the attacks that exist in rank space. Sybil
run: 10 sybil identities of one attacker against 6 honest nodes.

Each cell is the honest nodes' mean final test accuracy (mean over seeds). Detection: every
honest node flags neighbours by its trust score (node/algo/security/trust.py); over all (honest
observer, neighbour) pairs of the last round, precision = flagged and malicious / flagged,
recall = flagged and malicious / malicious. Trust is computed the same way under every
aggregator, but what it sees depends on the aggregator (a destroyed consensus makes every
update look odd), so it is reported per cell.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from node.algo.aggregate.robust import AGGREGATORS
from node.algo.security.attacks import ATTACKS
from node.app.bench import write_results
from node.app.bench.algorithms import FRL_NODE, run_method
from node.app.plotting import pyplot
from node.registry import SLICE_AGGREGATORS

# --algorithm: what the swarm runs (with diloco the attackers forge pseudo-gradients)
ALGORITHMS = {
    "gossip": {"algorithm": "gossip"},
    "diloco": {"algorithm": "diloco"},
    # one group of up to 16: DiLoCo's all-reduce as published (random groups would gather attackers in some)
    "diloco_allreduce": {
        "algorithm": "diloco",
        "outer_average": "all_reduce",
        "allreduce_group": 16,
        "keep_snapshots": 16,
    },
}


def algorithm_comm(algorithm: str, aggregators) -> dict:
    """The comm settings of `algorithm` (a key of ALGORITHMS) for a grid over `aggregators`. Raises ValueError, one
    line, for another name, frl with diloco (it averages models), or an all-reduce with an aggregator that needs
    whole updates."""
    if algorithm not in ALGORITHMS or (algorithm != "gossip" and "frl" in aggregators):
        raise ValueError(f"--algorithm: {', '.join(ALGORITHMS)} (diloco not with frl), got {algorithm!r}")
    if algorithm == "diloco_allreduce" and set(aggregators) - set(SLICE_AGGREGATORS):
        slices = ", ".join(SLICE_AGGREGATORS)
        raise ValueError(f"--aggregators: an all-reduce reduces slice by slice with {slices} only")
    return ALGORITHMS[algorithm]


def byzantine_count(honest: int, fraction: float) -> int:
    """The fewest byzantine nodes that make up at least `fraction` of the swarm."""
    return math.ceil(fraction * honest / (1 - fraction) - 1e-9)


# FRL (node/algo/frl.py, FRL_NODE) as a column of its own; the attacks that exist in rank space are
# applied to position vectors (node/protocol/rounds/ranks.py)
FRL_ATTACKS = ("label_flip", "sign_flip", "alie", "ipm", "reverse")
DEFENCES = (*AGGREGATORS, "frl")


def defence(agg: str) -> dict:
    """The nested node overrides of a column: an aggregator, or FRL."""
    return FRL_NODE if agg == "frl" else {"security": {"aggregator": agg}}


def cases(honest: int, byzantine: int, sybils: int, sybil_honest: int, attacks, aggregators):
    """(group, attack, aggregator, honest nodes, spec) for every run (specs: see
    node.app.bench.algorithms.methods; attackers are the last nodes of the swarm)."""
    for agg in aggregators:
        node = defence(agg)
        yield "grid", "none", agg, honest, {"node": node}
        for atk in attacks:
            if agg == "frl" and atk not in FRL_ATTACKS:
                continue
            yield "grid", atk, agg, honest, {"node": node, "attackers": byzantine, "attack": atk}
    for agg in aggregators:
        if agg == "frl":  # sybils train one model and never mix: no rank-space equivalent here
            continue
        node = {"security": {"aggregator": agg}}
        yield "sybil", "none", agg, sybil_honest, {"node": node}
        yield "sybil", "sybil", agg, sybil_honest, {"node": node, "attackers": sybils, "attack": "sybil"}


def run(
    base: dict,
    seeds: list[int],
    honest: int,
    byzantine: int,
    sybils: int,
    sybil_honest: int,
    attacks=ATTACKS,
    aggregators=DEFENCES,
    progress=None,
) -> list[dict]:
    """Every case over every seed: one row per simulation with accuracy, detection and the accuracy curve."""
    rows = []
    """Every case over every seed; `base`: nested NodeConfig overrides (data, rounds, topology)."""
    for group, atk, agg, good, spec in cases(honest, byzantine, sybils, sybil_honest, attacks, aggregators):
        for seed in seeds:
            res = run_method(spec, good + spec.get("attackers", 0), base, seed)
            row = dict(
                group=group,
                attack=atk,
                aggregator=agg,
                seed=seed,
                honest=good,
                byzantine=spec.get("attackers", 0),
                accuracy=statistics.fmean(res.final_accuracies),
                accuracy_min=min(res.final_accuracies),
                detection=res.detection,
                diverged=len(res.diverged),
                seconds=res.seconds,
                curve=[(log.round, log.accuracy_mean) for log in res.log],
            )
            rows.append(row)
            if progress:
                progress(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """{group: {attack: {aggregator: cell}}}, cells averaged over seeds."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["group"], {}).setdefault(r["attack"], {}).setdefault(r["aggregator"], []).append(r)
    for group in out.values():
        for by_agg in group.values():
            for agg, rs in by_agg.items():
                tp = fp = fn = 0
                for r in rs:
                    d = r["detection"] or {}
                    p, flagged, bad = d.get("precision"), d.get("flagged", 0), d.get("malicious_pairs", 0)
                    t = round((p or 0) * flagged)
                    tp, fp, fn = tp + t, fp + flagged - t, fn + bad - t
                by_agg[agg] = dict(
                    diverged=statistics.fmean(r.get("diverged", 0) for r in rs),
                    accuracy=statistics.fmean(r["accuracy"] for r in rs),
                    accuracy_min=min(r["accuracy_min"] for r in rs),
                    seeds=len(rs),
                    precision=tp / (tp + fp) if tp + fp else None,
                    recall=tp / (tp + fn) if tp + fn else None,
                    false_flags=fp,
                )
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def tables(summary: dict, aggregators=DEFENCES) -> str:
    """Markdown tables of honest accuracy and of detection precision / recall, per group."""
    parts = []
    for group, title in (("grid", "Every attack against every aggregator"), ("sybil", "Sybil run")):
        if group not in summary:
            continue
        g = summary[group]
        ref = g["none"]["mean"]["accuracy"] if "mean" in g.get("none", {}) else None
        aggs = [a for a in aggregators if a in g.get("none", {})]
        parts.append(
            f"### {title}: honest accuracy (%); * = within 5 points of plain gossip without attack"
            + (f" ({100 * ref:.1f}%)" if ref is not None else "")
            + "; (n†) = virtual nodes per run, honest or byzantine, that stopped with Diverged (NaN/Inf); honest"
            " ones count with their last good model"
        )
        parts.append("| attack | " + " | ".join(aggs) + " | best |")
        parts.append("|---|" + "---:|" * (len(aggs) + 1))
        for attack, by_agg in g.items():
            cells = []
            for a in aggs:
                c = by_agg.get(a)
                ok = c is not None and ref is not None and c["accuracy"] >= ref - 0.05
                gone = "" if c is None or not c["diverged"] else f" ({c['diverged']:g}†)"
                cells.append("" if c is None else f"{100 * c['accuracy']:.1f}{'*' if ok else ''}{gone}")
            best = max(by_agg, key=lambda a: by_agg[a]["accuracy"])
            parts.append(f"| {attack} | " + " | ".join(cells) + f" | {best} |")
        parts.append("")
        parts.append(
            f"### {title}: detection by the trust score, precision / recall (%) of flagged vs malicious"
            " neighbours in the last round (no-attack row: false flags, of all honest pairs)"
        )
        parts.append("| attack | " + " | ".join(aggs) + " |")
        parts.append("|---|" + "---:|" * len(aggs))
        for attack, by_agg in g.items():
            if attack == "none":
                cells = [f"{by_agg[a]['false_flags']} false" if a in by_agg else "" for a in aggs]
            else:
                cells = [
                    f"{_pct(by_agg[a]['precision'])} / {_pct(by_agg[a]['recall'])}" if a in by_agg else ""
                    for a in aggs
                ]
            parts.append(f"| {attack} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def plot(summary: dict, path: Path, aggregators=DEFENCES) -> None:
    """Heatmaps of honest accuracy (attack x aggregator) per group, written to `path` (PNG)."""
    plt = pyplot()
    groups = [g for g in ("grid", "sybil") if g in summary]
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(7 * len(groups), 4.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [len(summary[g]) for g in groups]},
    )
    for ax, group in zip(axes[0], groups):
        g = summary[group]
        attacks = list(g)
        aggs = [a for a in aggregators if a in g["none"]]
        grid = [[100 * g[atk][a]["accuracy"] if a in g[atk] else math.nan for atk in attacks] for a in aggs]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right")
        ax.set_yticks(range(len(aggs)), aggs)
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
        ax.set_title("attacks × aggregators" if group == "grid" else "sybils")
        ax.set_xlabel("attack")
        ax.set_ylabel("aggregator")
    fig.colorbar(im, ax=axes[0].tolist(), label="honest accuracy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and accuracy.png in `out`; returns their paths."""
    summary = summarize(rows)
    md = tables(summary)
    paths = write_results(
        out,
        dict(meta=meta, summary=summary, rows=rows),
        f"# {meta.get('title', 'byzantine')}\n\n    {meta.get('command', '')}\n\n{md}",
    )
    plot(summary, out / "accuracy.png")
    return [*paths, out / "accuracy.png"]

"""`atoll bench wan`: atoll's algorithms, Flower FedAvg and torchft's DiLoCo on one testbed of shaped links,
alternated repeat by repeat, and the simulator's prediction beside atoll's measurement.

A repeat runs every (system, method) once on one testbed built for the profile (one host per node and one for the
coordinator Flower and torchft need), in the same order; figures are medians over repeats. The reference is a
centralized model with one node's compute (train.rounds x train.local_steps steps on every node's data); the
target is `target_ratio` times its metric (perplexity: lower is better).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from node.app.bench import fresh_dir
from node.app.bench.wan import WanRun, compare, run_atoll
from node.app.testbed.profiles import HostLink, hosts
from node.app.testbed.testbed import Testbed
from node.config import SwarmConfig, apply_overrides

COORDINATOR_LINK = HostLink(1000, 1000)  # Flower's server and torchft's Lighthouse: a datacenter machine


# SparseLoCo's compression: the top 64 of every 4,096 values, 2-bit values, error feedback
SPARSELOCO = {
    "comm.codec": "topk2bit",
    "comm.topk_ratio": 1 / 64,
    "comm.int8_block": 4096,
    "comm.error_feedback": True,
}
STREAMED = {"comm.outer_average": "all_reduce", "comm.fragments": 4, "comm.sync_delay": 5}


def atoll_methods(rounds: int) -> dict[str, dict]:
    """atoll's methods as comm overrides: gossip every round, the late schedule (a third of the rounds' gossip,
    late) with the final all-reduce merge, CHOCO-SGD gossip with int8 and with top-5% values (both with error
    feedback), DiLoCo over gossip (outer Nesterov lr 0.7, momentum 0.9), DiLoCo with SparseLoCo's compression
    (top 64 of every 4,096 values, 2-bit, with error feedback), DiLoCo over the all-reduce, and Streaming DiLoCo over
    it (4 fragments, each all-reduce running during 5 inner steps), plain and with SparseLoCo's compression."""
    return {
        "gossip": {"comm.algorithm": "gossip"},
        "late_merge": {
            "comm.algorithm": "gossip",
            "comm.schedule": "late",
            "comm.gossip_budget": max(1, rounds // 3),
            "comm.final_merge": True,
        },
        "choco_int8": {"comm.algorithm": "gossip", "comm.codec": "int8", "comm.error_feedback": True},
        "choco_topk": {
            "comm.algorithm": "gossip",
            "comm.codec": "topk",
            "comm.topk_ratio": 0.05,
            "comm.error_feedback": True,
        },
        "diloco": {"comm.algorithm": "diloco"},
        "diloco_topk2bit": {"comm.algorithm": "diloco", **SPARSELOCO},
        "diloco_allreduce": {"comm.algorithm": "diloco", "comm.outer_average": "all_reduce"},
        "diloco_streamed": {"comm.algorithm": "diloco", **STREAMED},
        "diloco_streamed_topk2bit": {"comm.algorithm": "diloco", **STREAMED, **SPARSELOCO},
    }


def with_overrides(cfg: SwarmConfig, overrides: dict) -> SwarmConfig:
    """`cfg` with dotted node overrides applied as `--set` applies them (node.config.apply_overrides), validated
    again: raises pydantic's ValidationError or ConfigError."""
    tree = cfg.model_dump(mode="json")
    apply_overrides(tree["node"], overrides)
    return SwarmConfig.model_validate(tree)


@dataclass
class Report:
    """Every run, the validation rows (prediction beside measurement, per node of each atoll gossip run), the
    centralized reference metric and the target."""

    runs: list[WanRun] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    centralized: float | None = None
    target: float | None = None
    efficiency: float = 1.0


def run(
    cfg: SwarmConfig,
    profile: str,
    methods: list[str],
    systems: list[str],
    repeats: int,
    workdir: Path,
    target_ratio: float,
    pythons: dict[str, Path],
    progress: Callable[[str], None] = print,
) -> Report:
    """The benchmark (see the module docstring). `pythons`: the Flower and torchft environments' Pythons for the
    systems named. Raises BenchError, RuntimeError (a step of the testbed refused) or TimeoutError."""
    from node.app.bench.wan_peers import run_flower, run_torchft
    from node.app.swarm import centralized_baseline

    links = hosts(profile, cfg.nodes)
    report = Report()
    report.centralized = centralized_baseline(cfg.config_for(0))
    report.target = round(report.centralized * target_ratio, 4)
    progress(f"centralized reference (one node's compute): {report.centralized:.4f}; target {report.target}")
    every = atoll_methods(cfg.node.train.rounds)
    plan = [("atoll", m) for m in methods] + [(s, "") for s in systems if s != "atoll"]
    for rep in range(repeats):
        bed = Testbed.start([*links, COORDINATOR_LINK], "wan")
        try:
            if rep == 0:
                report.efficiency = bed.measure(0, 1, 4) / min(links[0].up_mbit, links[1].down_mbit)
                progress(f"a lone transfer h0 -> h1 reaches {report.efficiency:.1%} of its configured rate")
            for system, method in plan:
                where = fresh_dir(workdir / f"r{rep}-{system}-{method or system}")
                progress(f"repeat {rep + 1}/{repeats}: {system} {method}".rstrip())
                if system == "atoll":
                    c = with_overrides(cfg, every[method])
                    r = run_atoll(c, bed, where, method, rep, report.target)
                    if method == "gossip":
                        rows = compare(c, links, report.efficiency, r)
                        report.validation += [dict(repeat=rep, **row) for row in rows]
                elif system == "flower":
                    r = run_flower(cfg, bed, where, pythons["flower"], rep, report.target)
                else:
                    r = run_torchft(cfg, bed, where, pythons["torchft"], rep, report.target)
                progress(f"  {_line(r)}")
                report.runs.append(r)
        finally:
            bed.close()
    return report


def _line(r: WanRun) -> str:
    to = "never" if r.to_target_s is None else f"{r.to_target_s:.1f} s"
    return (
        f"to target {to}, wall {r.wall_s:.1f} s, utilization {r.utilization:.1%}, {r.mb_per_node:.1f} MB per node, "
        f"worst final {r.worst_final}"
    )


def medians(report: Report) -> list[dict]:
    """One row per (system, method): medians over repeats."""
    rows = []
    for key in dict.fromkeys((r.system, r.method) for r in report.runs):
        mine = [r for r in report.runs if (r.system, r.method) == key]
        reached = [r.to_target_s for r in mine if r.to_target_s is not None]
        rows.append(
            dict(
                system=key[0],
                method=key[1],
                repeats=len(mine),
                to_target_s=statistics.median(reached) if len(reached) == len(mine) else None,
                reached=f"{len(reached)}/{len(mine)}",
                wall_s=statistics.median(r.wall_s for r in mine),
                utilization=statistics.median(r.utilization for r in mine),
                mb_per_node=statistics.median(r.mb_per_node for r in mine),
                worst_final=statistics.median(r.worst_final for r in mine if r.worst_final is not None),
            )
        )
    return rows


def table(report: Report) -> str:
    """The medians as a Markdown table, then the validation: prediction beside measurement."""
    lines = [
        f"centralized (one node's compute): {report.centralized:.3f}; target: {report.target}",
        "",
        "| system | method | to target on every node (s) | wall (s) | compute utilization | MB per node | "
        "worst node, final |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in medians(report):
        to = "—" if m["to_target_s"] is None else f"{m['to_target_s']:.1f}"
        lines.append(
            f"| {m['system']} | {m['method']} | {to} ({m['reached']}) | {m['wall_s']:.1f} | {m['utilization']:.1%} "
            f"| {m['mb_per_node']:.1f} | {m['worst_final']:.3f} |"
        )
    if report.validation:
        lines += [
            "",
            "| repeat | node | up/down (Mbit/s) | wall: measured / predicted (s) | error | utilization: measured / "
            "predicted | error |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for v in report.validation:
            lines.append(
                f"| {v['repeat']} | {v['node']} | {v['up_mbit']:g}/{v['down_mbit']:g} | {v['measured_wall_s']:.1f} / "
                f"{v['predicted_wall_s']:.1f} | {v['wall_error']:+.1%} | {v['measured_utilization']:.1%} / "
                f"{v['predicted_utilization']:.1%} | {v['utilization_error']:+.1%} |"
            )
    return "\n".join(lines)


def write_outputs(report: Report, out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and wan.png (the worst node's metric against seconds since launch, every run)."""
    from node.app.bench import write_results
    from node.app.plotting import pyplot

    data = {
        "meta": meta,
        "centralized": report.centralized,
        "target": report.target,
        "efficiency": report.efficiency,
        "medians": medians(report),
        "validation": report.validation,
        "runs": [r.as_dict() for r in report.runs],
    }
    written = write_results(out, data, table(report))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = list(dict.fromkeys(f"{r.system} {r.method}" for r in report.runs))
    colours = {k: f"C{i}" for i, k in enumerate(keys)}
    for r in report.runs:
        if r.curve:
            xs, ys = zip(*r.curve)
            k = f"{r.system} {r.method}"
            ax.plot(xs, ys, color=colours[k], alpha=0.8, label=k if r.repeat == 0 else None)
    if report.target is not None:
        ax.axhline(report.target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the first process started")
    ax.set_ylabel("held-out metric of the worst node")
    ax.set_title("Same workload, same shaped links: every repeat")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "wan.png", dpi=120)
    plt.close(fig)
    return [*written, out / "wan.png"]

"""`atoll bench task`: any task's swarm (a swarm YAML) against the same nodes trained alone and
a centralized model, over seeds, through the round engine the daemons run (node/protocol/sim.py).

For each seed (train.seed = data.seed = seed): the swarm as configured; `isolated`, every node
training alone on its partition with the same steps; `centralized`, one model on the union of
the partitions with the same steps (node.app.swarm.centralized_baseline). Reports the task's metric:
the worst node's and the mean at the end (mean and spread over seeds) and its curve per round.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.app.swarm import centralized_baseline
from node.config import SwarmConfig
from node.protocol.sim import Simulation
from node.protocol.worker import Worker


@dataclass
class Row:
    """One method at one seed: the metric's name and direction, the worst and mean node at the
    end, and (swarm only) the worst node after each round."""

    method: str
    seed: int
    metric: str
    higher_is_better: bool
    worst: float
    mean: float
    curve: list[float] = field(default_factory=list)
    sent_per_node_round: float = 0.0  # swarm: bytes on the wire per node and round
    exchanged_bytes: int = 0  # the tensors that travel (Task.exchanged), raw
    model_bytes: int = 0  # the whole model, raw


def run(swarm: SwarmConfig, seeds: list[int], progress=print) -> list[Row]:
    """Swarm, isolated and centralized at every seed."""
    rows = []
    for seed in seeds:
        node = swarm.node.model_copy(deep=True)
        node.protocol.train.seed = node.protocol.data.seed = seed
        s = swarm.model_copy(update={"node": node})
        probe = Worker(s.config_for(0))
        metric, higher = probe.metric, probe.task.task.higher_is_better
        worst = max if not higher else min

        sim = Simulation(s).run()
        finals = sim.final_accuracies
        curve = [(log.accuracy_min if higher else log.accuracy_max) for log in sim.log]
        nbytes = lambda sd: sum(v.numel() * v.element_size() for v in sd.values())  # noqa: E731
        sent = sim.bytes_sent / (s.nodes * max(1, probe.cfg.train.rounds))
        rows.append(
            Row(
                "swarm",
                seed,
                metric,
                higher,
                worst(finals),
                statistics.fmean(finals),
                curve,
                sent,
                nbytes(probe.state()),
                nbytes(probe.full_state()),
            )
        )

        alone = []
        for i in range(s.nodes):
            w = Worker(s.config_for(i))
            for r in range(w.cfg.train.rounds):
                w.train(r)
            alone.append(w.evaluate())
        rows.append(Row("isolated", seed, metric, higher, worst(alone), statistics.fmean(alone)))

        central = centralized_baseline(s.config_for(0))
        rows.append(Row("centralized", seed, metric, higher, central, central))
        progress(
            f"  seed {seed}: swarm worst {worst(finals):.4g}, isolated worst {worst(alone):.4g}, central {central:.4g}"
        )
    return rows


def table(rows: list[Row]) -> str:
    """Markdown: per method, the worst node and the mean node (mean ± standard deviation over
    seeds), and the worst node's ratio to the centralized model."""
    metric = rows[0].metric
    central = statistics.fmean(r.worst for r in rows if r.method == "centralized")
    lines = [
        f"| method | worst node's {metric} | mean node's {metric} | worst / centralized |",
        "|---|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        w, m = [r.worst for r in mine], [r.mean for r in mine]
        spread = lambda xs: f"{statistics.fmean(xs):.4g} ± {statistics.pstdev(xs):.2g}"  # noqa: E731
        lines.append(f"| {method} | {spread(w)} | {spread(m)} | {statistics.fmean(w) / central:.3f} |")
    swarm = [r for r in rows if r.method == "swarm"]
    lines.append("")
    sent = statistics.fmean(r.sent_per_node_round for r in swarm) / 1e3
    lines.append(
        f"Sent per node and round: {sent:.1f} kB; the tensors that travel: "
        f"{swarm[0].exchanged_bytes / 1e3:.1f} kB of a {swarm[0].model_bytes / 1e3:.1f} kB model."
    )
    return "\n".join(lines)


def write_outputs(rows: list[Row], out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and curve.png (the swarm's worst node per round, every seed, with
    the isolated and centralized ends as lines)."""
    from node.app.bench import write_results
    from node.app.plotting import pyplot

    written = write_results(out, {"meta": meta, "rows": [asdict(r) for r in rows]}, table(rows))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.method == "swarm":
            ax.plot(
                range(1, len(r.curve) + 1),
                r.curve,
                color="C0",
                alpha=0.8,
                label="swarm" if r.seed == rows[0].seed else None,
            )
    for method, colour in (("isolated", "C3"), ("centralized", "C2")):
        ax.axhline(
            statistics.fmean(r.worst for r in rows if r.method == method),
            color=colour,
            linestyle="--",
            label=f"{method} (end)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel(f"worst node's {rows[0].metric}")
    if not rows[0].higher_is_better:
        ax.set_yscale("log")
    ax.set_title(meta.get("title", "swarm against isolated and centralized training"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    return [*written, out / "curve.png"]

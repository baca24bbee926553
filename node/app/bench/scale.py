"""`atoll bench scale`: how the simulator scales with the number of virtual nodes.

Each size runs in its own process (spawned), so the peak resident memory reported is that
run's alone. Method: D-PSGD on a ring, the same per-node work at every size, on an iid
partition (digits has 1,347 training images: 256 nodes get about 5 each, too few for a
Dirichlet draw; this benchmark measures cost, not accuracy).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from pathlib import Path

from node.app.bench import write_results
from node.app.plotting import pyplot


def _one(nodes: int, rounds: int, local_steps: int, conn) -> None:
    from node.app.bench import BENCH_NODE, merged
    from node.config import NodeConfig, SwarmConfig
    from node.protocol.sim import Simulation

    t0 = time.perf_counter()
    tree = merged(BENCH_NODE, {"train": {"rounds": rounds, "local_steps": local_steps}, "data": {"partition": "iid"}})
    sim = Simulation(SwarmConfig(nodes=nodes, node=NodeConfig.model_validate(tree)), eval_every=rounds)
    setup = time.perf_counter() - t0
    res = sim.run()
    conn.send(
        dict(
            nodes=nodes,
            rounds=rounds,
            setup_seconds=setup,
            seconds_per_round=res.seconds / rounds,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            accuracy_mean=sum(res.final_accuracies) / len(res.final_accuracies),
            bytes_sent=res.bytes_sent,
        )
    )


def run(sizes: list[int], rounds: int, local_steps: int, progress=None) -> list[dict]:
    """One simulation per size, each in its own spawned process (so peak memory is its own); one row per size."""
    ctx = mp.get_context("spawn")
    rows = []
    for n in sizes:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_one, args=(n, rounds, local_steps, child))
        p.start()
        try:
            deadline = time.monotonic() + 3600
            while not parent.poll(1.0):
                if not p.is_alive():
                    raise RuntimeError(f"{n} nodes: the simulation process died (exit code {p.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n} nodes: no result within an hour")
            rows.append(parent.recv())
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
        if progress:
            progress(rows[-1])
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| nodes | rounds | seconds per round | peak memory (MB) | mean accuracy | MB sent |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['rounds']} | {r['seconds_per_round']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{100 * r['accuracy_mean']:.1f} | {r['bytes_sent'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and scale.png in `out`; returns their paths."""
    written = write_results(out, {"meta": meta, "rows": rows}, table(rows))
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["nodes"] for r in rows]
    ax[0].plot(n, [r["seconds_per_round"] for r in rows], marker="o")
    ax[0].set_ylabel("seconds per round")
    ax[1].plot(n, [r["peak_rss_mb"] for r in rows], marker="o")
    ax[1].set_ylabel("peak memory (MB)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("virtual nodes")
        a.set_ylim(bottom=0)  # from zero: a zoomed axis makes a flat line look like growth
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)
    return [*written, out / "scale.png"]

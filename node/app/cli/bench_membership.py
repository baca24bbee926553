"""`atoll bench membership`: sampled membership at 1,000 to 30,000 simulated nodes, calibrated on a real DHT."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from node.app.cli.bench import bench_app, report
from node.app.cli.common import fail, float_list, int_list


@bench_app.command("membership")
def bench_membership(
    sizes: str = typer.Option("100,1000,10000,30000", help="Honest swarm sizes simulated, comma-separated."),
    rounds: int = typer.Option(60, min=5, max=5000, help="Rounds per swarm size (and per churn run)."),
    attack_nodes: int = typer.Option(1000, min=10, max=100000, help="Honest nodes in the attack runs."),
    attackers: str = typer.Option("0.05,0.1,0.2,0.3", help="Attackers' shares of identities, comma-separated."),
    floods: str = typer.Option("1,10", help="Pushes per attacker identity per round (honest: 1), comma-separated."),
    attack_rounds: int = typer.Option(150, min=5, max=5000, help="Rounds per attack run."),
    view: int = typer.Option(64, min=4, max=256, help="View slots (v)."),
    calibration_rows: str = typer.Option(
        "64,1000,2000,3000,4000", help="Tickets under one real DHT key, comma-separated (empty: no calibration)."
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and membership.png here."),
) -> None:
    """How membership scales: Basalt peer sampling (the views a daemon with net.membership=sampled keeps) simulated for
    swarms of up to 30,000 nodes in one process, with wire sizes measured on a real gRPC server and the DHT read
    measured on real hivemind DHT nodes. Reports membership bytes per node per round (p50, p99, max) against swarm
    size beside today's single DHT key, the attackers' share of honest views at 5% to 30% attacker identities with
    and without flooding, join and leave latency under churn, and the real DHT's bytes per read."""
    from node.app.bench import membership_report
    from node.app.bench.membership import Costs
    from node.app.bench.membership_costs import measure
    from node.app.bench.membership_dht import calibrate

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    size_list = int_list(sizes, "--sizes", 10, 100000)
    shares = float_list(attackers, "--attackers", 0.0, 0.9)
    flood_list = float_list(floods, "--floods", 0.0, 1000.0)
    cal_rows = int_list(calibration_rows, "--calibration-rows", 1, 20000) if calibration_rows.strip() else []
    try:
        wire = measure(view)
        calibration = calibrate(cal_rows, progress=lambda r: typer.echo(f"  DHT: {r}", err=True)) if cal_rows else []
    except (OSError, RuntimeError) as e:
        fail(str(e))
    bucket = membership_report.bucket_read(calibration)
    costs = Costs(
        pull=wire["pull"],
        push=wire["push"],
        probe=wire["probe"],
        bucket_read=int(bucket["bytes_per_read"]) if bucket else 0,
    )
    parts = membership_report.run(
        size_list,
        attack_nodes,
        shares,
        flood_list,
        rounds,
        attack_rounds,
        costs,
        view,
        progress=lambda m: typer.echo(m, err=True),
    )
    typer.echo(membership_report.tables(parts, calibration, costs))
    report(out, {}, lambda out, meta: membership_report.write_outputs(parts, calibration, costs, out, meta))

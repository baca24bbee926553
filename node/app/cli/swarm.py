"""`atoll swarm up`: N daemons on this machine, a live table, and a summary against a centralized baseline."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import typer

from node.app.cli.common import (
    SET_HELP,
    GracefulStop,
    fail,
)

swarm_app = typer.Typer(help="Run a whole swarm on this machine (loopback) to try atoll.", no_args_is_help=True)


@swarm_app.command("up")
def swarm_up(
    nodes: int | None = typer.Option(
        None, "--nodes", "-n", min=1, max=64, help="Number of node processes (default: the config's, else 4)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Swarm YAML (nodes, node: shared config, per_node: overrides)."
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every node."),
    rounds: int | None = typer.Option(None, min=1, help="Shortcut for --set train.rounds=N."),
    alpha: float | None = typer.Option(None, help="Shortcut for --set data.alpha=A (Dirichlet partition)."),
    out: Path | None = typer.Option(None, help="Write results.json here."),
    workdir: Path | None = typer.Option(
        None, help="Keys, checkpoints, configs and logs of the nodes (default: a temp dir)."
    ),
) -> None:
    """Start N daemons on 127.0.0.1 (real DHT, gRPC and metrics), show their progress, and
    compare the result with a centralized baseline trained in the same run."""
    import tempfile

    from node.app import swarm
    from node.config import ConfigError, load_swarm_config, parse_override
    from node.protocol.worker import NonFinite

    try:
        overrides = dict(parse_override(s) for s in set_)
        overrides.update({k: v for k, v in {"train.rounds": rounds, "data.alpha": alpha}.items() if v is not None})
        scfg = load_swarm_config(config, overrides, nodes)
    except ConfigError as e:
        fail(str(e))
    base = scfg.node
    if base.task is not None:  # a broken task is one line here, not a node that exits
        from node.protocol.data import DatasetMissing
        from node.protocol.worker import Worker
        from node.task import TaskError

        try:
            Worker(scfg.config_for(0))  # the task's hooks run once, as each node will run them
        except (TaskError, ConfigError, DatasetMissing) as e:
            fail(str(e))
    wd = workdir or Path(tempfile.mkdtemp(prefix="atoll-swarm-"))
    try:
        swarm.check_workdir(wd)
        swarm.node_configs(scfg, wd)  # every --set applies to N nodes on one host, or one line says why not
        if out is not None and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
    except ValueError as e:
        fail(str(e))
    import threading

    from rich.console import Console
    from rich.live import Live

    from node.app import console

    typer.echo(
        console.with_path(f"starting {scfg.nodes} nodes; keys, checkpoints and logs in", wd, console.width()), err=True
    )
    stop = threading.Event()
    GracefulStop(stop.set, message="stopping all nodes: they checkpoint and leave")
    err = Console(stderr=True)
    t0 = time.monotonic()
    with Live(console=err, refresh_per_second=4, transient=False) as live:

        def update(runs):
            live.update(console.swarm_table(runs, base.train.rounds, time.monotonic() - t0, console.width()))

        try:
            runs = swarm.run_swarm(scfg, wd, update, stop=stop)
        except (RuntimeError, TimeoutError) as e:
            fail(str(e))
    if not err.is_terminal:  # piped: rich leaves the cursor after the table's last line
        err.print()
    wall = time.monotonic() - t0
    if stop.is_set():
        res = swarm.results(runs, {}, scfg, wall)
        typer.echo(
            console.with_path(f"interrupted after {wall:.1f} s; the nodes checkpointed in", wd, console.width())
        )
        for n in res["nodes"]:
            score = console.score_text(n["metric"], n["final_score"])
            where = f"{n['state']} at round {n['rounds'] or 0}"
            typer.echo(f"  node {n['index']} ({n['model']}): {where}, {n['metric']} {score}")
        _write_results(out, dict(res, interrupted=True))
        raise typer.Exit(130)
    typer.echo("training the centralized baseline (same model and steps, all data)...", err=True)
    try:
        baselines = swarm.centralized_baselines(scfg)
    except (ArithmeticError, RuntimeError, ValueError, NonFinite) as e:  # the run's results still count
        typer.secho(f"the centralized baseline failed: {str(e).splitlines()[0]}", fg=typer.colors.YELLOW, err=True)
        baselines = {}
    res = swarm.results(runs, baselines, scfg, wall)
    unfinished = [n["index"] for n in res["nodes"] if (n["rounds"] or 0) < base.train.rounds]
    if unfinished:
        typer.secho(f"nodes {unfinished} stopped before round {base.train.rounds}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"swarm of {scfg.nodes} ran up to {base.train.rounds} rounds in {wall:.1f} s"
        + (f" ({scfg.nodes - len(unfinished)} nodes finished)" if unfinished else "")
    )
    names = list(dict.fromkeys(n["model"] for n in res["nodes"]))
    for name in names:
        mine = [n for n in res["nodes"] if n["model"] == name and n["final_score"] is not None]
        if not mine:
            continue
        scores = [n["final_score"] for n in mine]
        metric = mine[0]["metric"]
        higher = runs[mine[0]["index"]].ready.get("higher_is_better", True)
        worst = min(scores) if higher else max(scores)
        show = functools.partial(console.score_text, metric)
        label = f" {name}" if len(names) > 1 else ""
        typer.echo(
            f"  node {metric}{label}: min {show(min(scores))}  mean {show(sum(scores) / len(scores))}  "
            f"max {show(max(scores))}"
        )
        baseline = baselines.get(name)
        if baseline is None:
            continue
        behind = baseline - worst if higher else worst - baseline  # > 0: the worst node is behind
        amount = f"{100 * abs(behind):.1f} points" if metric == "accuracy" else f"{abs(behind):.4g}"
        gap = f"{amount} {'behind' if behind > 0 else 'ahead'}"
        typer.echo(f"  centralized baseline{label}: {metric} {show(baseline)}  (the worst node is {gap})")
    sent = sum(n["sent_bytes"] or 0 for n in res["nodes"])
    typer.echo(f"  bytes sent by all nodes: {console.size(sent)}")
    if res["median_round_ms"] is not None and res["first_round_seconds"] is not None:
        typer.echo(
            f"  median round: {res['median_round_ms']:.0f} ms; launch to first round: "
            f"{res['first_round_seconds']:.1f} s (slowest node)"
        )
    _write_results(out, res)
    if unfinished:
        raise typer.Exit(1)


def _write_results(out: Path | None, res: dict) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2))
        typer.echo(f"wrote {out / 'results.json'}", err=True)

"""`atoll node start`: one training daemon in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from node.app.cli.common import (
    IDENTITY_OPTION,
    PEERS_OPTION,
    SET_HELP,
    GracefulStop,
    fail,
    join_overrides,
    json_event,
    load,
)
from node.app.cli.roles import run_role

node_app = typer.Typer(help="Run one node daemon.", no_args_is_help=True)


@node_app.command("start")
def node_start(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    initial_peers: list[str] = PEERS_OPTION,
    identity: Path | None = IDENTITY_OPTION,
    checkpoint_dir: Path | None = typer.Option(None, help="Where checkpoints go; a restart resumes from them."),
    metrics_port: int | None = typer.Option(None, help="Prometheus endpoint port (0 = any free port)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print progress as JSON lines (for tools)."),
) -> None:
    """Start one node in the foreground: join the swarm, train, gossip, checkpoint. SIGTERM or
    Ctrl-C finishes the current step, checkpoints and leaves cleanly."""
    extra = join_overrides(
        initial_peers,
        identity,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        metrics_port=metrics_port,
    )
    cfg = load(config, set_, extra)
    if cfg.role != "trainer":
        run_role(cfg, json_events)
        return
    stopper = GracefulStop()
    logging.getLogger().setLevel(cfg.log_level)
    from node.net.daemon import Node
    from p2pd.discovery import DiscoveryError
    from p2pd.identity import IdentityError

    node = Node(cfg, on_event=json_event if json_events else _human_event)
    stopper.target = node.request_stop
    try:
        summary = node.run()
    except (DiscoveryError, IdentityError, OSError, RuntimeError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if summary["event"] == "stopped":
        raise typer.Exit(0)


def _human_event(e: dict) -> None:
    from node.app import console

    kind = e["event"]
    if kind == "ready":
        for line in console.ready_lines(e, "node", "atoll node start"):
            typer.echo(line)
    elif kind == "waiting":
        typer.echo(console.waiting_line(e))
    elif kind == "joinable":  # the DHT is up; "ready" (with the join command) follows
        pass
    elif kind == "round":
        typer.echo(console.round_line(e, console.width()))
    else:
        metric = e.get("metric", "accuracy")
        score = console.score_text(metric, e.get("score"))
        typer.echo(f"{kind} at round {e['round']}: {metric} {score}")

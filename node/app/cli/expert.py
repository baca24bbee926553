"""`atoll expert train`: one diffusion expert, trained in isolation and optionally served."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.common import (
    IDENTITY_OPTION,
    PEERS_OPTION,
    SET_HELP,
    fail,
    join_overrides,
    load,
)
from node.app.cli.roles import run_role

expert_app = typer.Typer(
    help="Decentralized diffusion experts: one per data cluster, trained in isolation.", no_args_is_help=True
)


@expert_app.command("train")
def expert_train(
    cluster: int = typer.Option(..., "--cluster", "-k", min=0, help="The cluster this expert models."),
    clusters: int | None = typer.Option(None, help="K, the number of clusters (default: experts.clusters)."),
    steps: int | None = typer.Option(None, help="Training steps (default: experts.steps)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    checkpoint_dir: Path | None = typer.Option(None, help="Checkpoints go to DIR/expert-K; a rerun resumes."),
    serve: bool = typer.Option(False, "--serve", help="After training, join the swarm and serve predictions."),
    initial_peers: list[str] = PEERS_OPTION,
    identity: Path | None = IDENTITY_OPTION,
    json_events: bool = typer.Option(False, "--json-events", help="Print progress as JSON lines."),
) -> None:
    """Train the flow-matching expert of one data cluster, in isolation (no communication at
    all), checkpointing as it goes; with --serve it then answers Predict calls (the same as
    `atoll node start --set role=expert`)."""
    if (initial_peers or identity) and not serve:
        fail("--initial-peers and --identity join a swarm: add --serve (training alone needs no swarm)")
    extra = join_overrides(
        initial_peers,
        identity,
        role="expert",
        **{
            "experts.cluster": cluster,
            "experts.clusters": clusters,
            "experts.steps": steps,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        },
    )
    run_role(load(config, set_, extra), json_events, serve=serve)

"""`atoll config show`: the effective configuration."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.common import (
    SET_HELP,
    load,
)

config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the effective configuration (defaults, then the file, then --set)."""
    from node.config import dump_config

    typer.echo(dump_config(load(config, set_)), nl=False)

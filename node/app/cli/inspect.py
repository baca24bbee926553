"""The top-level inspect commands: `atoll status`, `atoll prometheus-targets`, `atoll version`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from node.app.cli.common import (
    DIRECTORY_BITS_HELP,
    SWARM_HINT,
    GracefulStop,
    fail,
    observer,
)
from p2pd import __version__


def status(
    peers: list[str] = typer.Option(..., "--peers", "-p", help="Multiaddr of any swarm member (repeatable)."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name (the DHT key atoll/<swarm>/peers)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
    wait: float = typer.Option(2.0, min=0.0, help="Seconds to let the DHT settle before reading."),
    directory_bits: int = typer.Option(0, min=0, max=12, help=DIRECTORY_BITS_HELP),
) -> None:
    """The swarm as the DHT sees it: every live node's signed record."""
    with observer(peers, swarm_name, directory_bits) as d:
        time.sleep(wait)
        records = d.live_peers()
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    typer.echo(f"{len(records)} live node(s) in swarm {swarm_name!r}")
    if not records:
        typer.echo(f"  {SWARM_HINT}")
        return
    from rich.console import Console

    from node.app import console

    Console(width=console.width()).print(console.status_table(records, console.width()))


def prometheus_targets(
    peers: list[str] = typer.Option(..., "--peers", "-p", help="Multiaddr of any swarm member (repeatable)."),
    out: Path = typer.Option(..., help="The file_sd JSON file Prometheus reads (replaced atomically)."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name."),
    every: float = typer.Option(0.0, min=0.0, help="Rewrite every this many seconds until stopped (0: once)."),
    wait: float = typer.Option(2.0, min=0.0, help="Seconds to let the DHT settle before the first read."),
    directory_bits: int = typer.Option(0, min=0, max=12, help=DIRECTORY_BITS_HELP),
) -> None:
    """Write Prometheus file_sd targets (every live node's metrics endpoint) from the DHT, so
    Prometheus follows the swarm as nodes join and leave."""
    import threading

    from node.app.prometheus_sd import targets, write_atomic
    from p2pd.discovery import DiscoveryError

    stop = threading.Event()
    GracefulStop(stop.set)
    with observer(peers, swarm_name, directory_bits) as d:
        stop.wait(wait)
        while True:
            try:
                groups = targets(d.live_peers(), swarm_name)
                write_atomic(out, groups)
                typer.echo(f"{len(groups)} target(s) -> {out}", err=True)
            except DiscoveryError as e:  # keep the last good file; try again next time
                typer.echo(f"warning: {e}", err=True)
            except OSError as e:
                fail(f"cannot write {out}: {e}")
            if not every or stop.wait(every):
                break


def version() -> None:
    """Print the atoll version."""
    typer.echo(__version__)

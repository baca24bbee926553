"""The `atoll` command: the Typer app that wires one module per command group (node, config,
identity, new, swarm, expert, router, bench, and the top-level inspect commands) and `main`."""

from __future__ import annotations

import logging

import typer

from node.app.cli.bench import bench_app
from node.app.cli.bench_experts import bench_experts  # noqa: F401  (registers `bench experts`)
from node.app.cli.bench_membership import bench_membership  # noqa: F401  (registers `bench membership`)
from node.app.cli.bench_wan import bench_wan  # noqa: F401  (registers `bench wan` on bench_app)
from node.app.cli.config import config_app
from node.app.cli.expert import expert_app
from node.app.cli.identity import identity_app
from node.app.cli.inspect import prometheus_targets, status, version
from node.app.cli.new import new_app
from node.app.cli.node import node_app
from node.app.cli.router import router_app
from node.app.cli.swarm import swarm_app

ORDER = ("swarm", "node", "new", "status", "config", "identity", "prometheus-targets", "version", "expert", "router")


class _Ordered(typer.core.TyperGroup):
    """`atoll --help` lists commands in the order a newcomer needs them, not as registered."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


app = typer.Typer(
    help="atoll: a peer-to-peer training daemon.", no_args_is_help=True, add_completion=False, cls=_Ordered
)
# help panels, in the order a newcomer needs them
TRAIN, INSPECT, EXPERTS, MEASURE = "Train", "Inspect", "Diffusion experts", "Measure"
app.add_typer(swarm_app, name="swarm", rich_help_panel=TRAIN)
app.add_typer(node_app, name="node", rich_help_panel=TRAIN)
app.add_typer(new_app, name="new", rich_help_panel=TRAIN)
app.add_typer(config_app, name="config", rich_help_panel=INSPECT)
app.add_typer(identity_app, name="identity", rich_help_panel=INSPECT)
app.command(rich_help_panel=INSPECT)(status)
app.command("prometheus-targets", rich_help_panel=INSPECT)(prometheus_targets)
app.command(rich_help_panel=INSPECT)(version)
app.add_typer(expert_app, name="expert", rich_help_panel=EXPERTS)
app.add_typer(router_app, name="router", rich_help_panel=EXPERTS)
app.add_typer(bench_app, name="bench", rich_help_panel=MEASURE)


def _thread_excepthook(args) -> None:
    """multiprocessing's resource-sharer thread raises ConnectionResetError when a hivemind
    child is killed while it asks this process for a file descriptor (a stop by SIGTERM to
    every process, as systemd sends): expected at stop, so one log line, not a traceback."""
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if (
        issubclass(args.exc_type, ConnectionError)
        and tb is not None
        and tb.tb_frame.f_code.co_filename.endswith("multiprocessing/connection.py")
    ):
        logging.getLogger("atoll").info("a child process hung up: %s", args.exc_value)
        return
    _default_thread_excepthook(args)


def main() -> None:
    """Entry point of the `atoll` command."""
    import threading

    global _default_thread_excepthook
    _default_thread_excepthook = threading.excepthook
    threading.excepthook = _thread_excepthook
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()

"""What `node start`, `expert train` and `router serve` share to run an expert or router node in the foreground and
print its events."""

from __future__ import annotations

import logging

import typer

from node.app.cli.common import GracefulStop, fail, json_event


def run_role(cfg, json_events: bool, serve: bool = True) -> dict:
    """Run an expert or router node in the foreground until done or SIGTERM / Ctrl-C."""
    stopper = GracefulStop()
    from node.net.checkpoint import CheckpointError
    from node.net.experts.roles import ExpertNode
    from node.net.experts.router_role import RouterNode
    from p2pd.discovery import DiscoveryError
    from p2pd.identity import IdentityError

    logging.getLogger().setLevel(cfg.log_level)
    emit = json_event if json_events else role_event
    try:
        node = ExpertNode(cfg, emit) if cfg.role == "expert" else RouterNode(cfg, emit)
        stopper.target = node.request_stop
        result = node.run(serve) if cfg.role == "expert" else node.run()
    except (DiscoveryError, IdentityError, CheckpointError, OSError, RuntimeError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    emit(result)
    return result


def role_event(e: dict) -> None:
    """Print an expert or router event `e` for a person (training progress, ready, done, stopped)."""
    from node.app import console

    kind = e["event"]
    if kind == "expert":
        on = f" on {e['device']}" if e.get("device") else ""
        typer.echo(f"expert of cluster {e['cluster']} of {e['clusters']}: training on {e['images']} images{on}")
    elif kind == "train":
        typer.echo(f"{e['role']} step {e['step']:>6}/{e['steps']}  loss {e['loss']:.4f}  {e['seconds']:.0f}s")
    elif kind == "trained":
        rate = f", {e['images_per_second']:.0f} images/s" if e.get("images_per_second") else ""
        typer.echo(f"{e['role']} trained: {e['steps']} steps, loss {e['loss']:.4f}, {e['seconds']:.0f}s{rate}")
    elif kind == "ready":
        what = f"expert of cluster {e['cluster']}" if e["role"] == "expert" else "router"
        for line in console.ready_lines(
            e, what, f"atoll {'expert train' if e['role'] == 'expert' else 'router serve'} ..."
        ):
            typer.echo(line)
        typer.echo(f"{what} serving on {e['grpc']} (Ctrl-C stops it)")
        if e.get("http"):
            typer.echo(f"HTTP API and page: {e['http']}/  (curl {e['http']}/healthz)")
        if e.get("metrics_port"):
            typer.echo(f"Prometheus metrics on port {e['metrics_port']}")
    elif kind == "evaluated":
        typer.echo(f"expert of cluster {e['cluster']}: held-out flow loss {e['flow_loss']:.4f}")
    elif kind == "done":
        typer.echo(f"expert of cluster {e['cluster']} done, checkpoint {e['checkpoint'][:16]}")
    elif kind == "stopped":
        where = f" at step {e['step']} (checkpointed)" if "step" in e else ""
        typer.echo(f"stopped{where}")
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in e.items()))

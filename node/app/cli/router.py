"""`atoll router serve` and `atoll router query`: the ensemble router and a client of it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import typer

from node.app.cli.common import (
    DIRECTORY_BITS_HELP,
    IDENTITY_OPTION,
    PEERS_OPTION,
    SET_HELP,
    SWARM_HINT,
    fail,
    join_overrides,
    load,
    observer,
)
from node.app.cli.roles import run_role

router_app = typer.Typer(help="The router that samples images from the live experts' ensemble.", no_args_is_help=True)


@router_app.command("serve")
def router_serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    initial_peers: list[str] = PEERS_OPTION,
    identity: Path | None = IDENTITY_OPTION,
    checkpoint_dir: Path | None = typer.Option(None, help="The router's checkpoint goes to DIR/router."),
    http_port: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="Also serve the HTTP API (POST /v1/samples, GET /v1/experts, /healthz, /openapi.json) and a page at / "
        "on this port (0: a free one; default: experts.http_port).",
    ),
    metrics_port: int | None = typer.Option(None, min=0, max=65535, help="Prometheus endpoint port (0: any free)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print progress as JSON lines."),
) -> None:
    """Train (or load) the router p(cluster | x_t, t), join the swarm and serve ensemble
    sampling over the experts live in the DHT, over gRPC and, with --http-port, HTTP (the same as
    `atoll node start --set role=router`)."""
    extra = join_overrides(
        initial_peers,
        identity,
        role="router",
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        **{"experts.http_port": http_port, "metrics_port": metrics_port},
    )
    run_role(load(config, set_, extra), json_events)


@router_app.command("query")
def router_query(
    router: str | None = typer.Option(None, help="The router's gRPC host:port."),
    peers: list[str] = typer.Option([], "--peers", "-p", help="Or: a swarm member's multiaddr, to find a router."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name (with --peers)."),
    directory_bits: int = typer.Option(0, min=0, max=12, help=DIRECTORY_BITS_HELP + " With --peers."),
    n: int = typer.Option(16, min=1, help="Images to sample."),
    strategy: str = typer.Option("top1", help="top1, top2, ..., or full."),
    seed: int = typer.Option(0, min=0),
    steps: int = typer.Option(0, min=0, help="Euler steps (0: the router's default)."),
    out: Path | None = typer.Option(None, help="Write the images as a PNG grid here."),
    timeout: float = typer.Option(300.0, min=1.0, help="Seconds to wait for the answer."),
    as_json: bool = typer.Option(False, "--json", help="Print which experts served each image as JSON."),
    wait: float = typer.Option(
        10.0, min=0.5, max=300.0, help="With --peers: seconds to look for a live router in the DHT before giving up."
    ),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="For a router serving TLS (net.tls_cert): the CA certificate that signed its cert."
    ),
) -> None:
    """Ask a router for images; prints which experts served each one."""
    import grpc

    from node.algo.experts.ensemble import parse_strategy
    from node.net.experts.service import matrix_from_pb
    from p2pd.client import open_channel
    from p2pd.rpc import router_pb2 as rpb
    from p2pd.rpc import router_pb2_grpc as rpb_grpc
    from p2pd.server import TLSConfig

    try:  # the form only: how many experts the router has, it checks itself
        parse_strategy(strategy, 999)
    except ValueError:
        fail(f"--strategy must be top1, top2, ... or full, got {strategy!r}")
    if router is not None and not re.fullmatch(r"\S+:[0-9]{1,5}", router):
        fail(f"--router must be HOST:PORT, got {router!r}")
    address = router or _find_router(peers, swarm_name, wait, directory_bits)
    tls = TLSConfig(ca_file=tls_ca) if tls_ca else None
    if tls_ca is not None and not tls_ca.is_file():
        fail(f"--tls-ca {tls_ca}: no such file")
    with open_channel(address, [("grpc.max_receive_message_length", 64 * 2**20)], tls) as ch:
        try:
            reply = rpb_grpc.RouterStub(ch).Sample(
                rpb.SampleRequest(n=n, strategy=strategy, seed=seed, steps=steps), timeout=timeout
            )
        except grpc.RpcError as e:
            fail(f"router {address}: {e.code().name}: {e.details()}")
    shape = tuple(reply.image_shape)
    try:
        if len(shape) != 3:
            raise ValueError(f"image shape {shape}")
        images = matrix_from_pb(reply.images, shape[0] * shape[1] * shape[2], max_rows=n)
    except ValueError as e:
        fail(f"router {address} sent a bad reply: {e}")
    served = [list(s.clusters) for s in reply.served]
    per_step = [s.fewest for s in reply.served]
    live = list(reply.live)
    fewest = min(per_step, default=0)
    if as_json:
        typer.echo(
            json.dumps(
                dict(
                    n=len(images),
                    shape=list(shape),
                    served=served,
                    per_step=per_step,
                    failed=list(reply.failed),
                    clusters=reply.clusters,
                    live=live,
                    per_image=reply.per_image,
                )
            )
        )
    else:
        typer.echo(
            f"{len(images)} images of shape {shape} from {address} ({strategy}); "
            f"{len(live)} of {reply.clusters} experts live: {', '.join(map(str, live)) or 'none'}"
        )
        for i, (s, f) in enumerate(zip(served, per_step)):
            typer.echo(f"  image {i:>3}: {f} per step, from experts {', '.join(map(str, s)) or '-'}")
        for f in reply.failed:
            typer.echo(f"  dropped expert {f}")
    if served and fewest < reply.per_image:
        missing = sorted(set(range(reply.clusters)) - set(live))
        typer.secho(
            f"warning: {strategy} asks for {reply.per_image} experts per image, but some steps mixed only "
            f"{fewest}: {len(live)} of {reply.clusters} experts were live"
            + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
            + (f", {len(reply.failed)} dropped during the run" if reply.failed else ""),
            fg=typer.colors.YELLOW,
            err=True,
        )
    if out is not None:
        from node.app.grid import save_grid

        save_grid(images.reshape(len(images), *shape), out)
        typer.echo(f"wrote {out}", err=True)


def _find_router(peers: list[str], swarm_name: str, wait: float, directory_bits: int = 0) -> str:
    """The gRPC address of a live router of `swarm_name`, looked for in the DHT for `wait` seconds at most; one line
    and exit 2 when there is none (naming --swarm when no node at all is live)."""
    if not peers:
        fail("give --router HOST:PORT or --peers MADDR")
    with observer(peers, swarm_name, directory_bits) as d:
        for _ in range(max(1, round(wait / 0.5))):  # bounded: `wait` s for the DHT to answer
            live = d.live_peers()
            routers = [r for r in live if "router" in r.roles]
            if routers:
                return routers[0].grpc_address
            time.sleep(0.5)
    if live:
        fail(f"no live router in swarm {swarm_name!r} ({len(live)} live node(s), none a router: atoll router serve)")
    fail(f"no live node in swarm {swarm_name!r}: {SWARM_HINT}")

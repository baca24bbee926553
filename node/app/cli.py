"""The `atoll` command."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path

import typer

from p2pd import __version__

ORDER = ("swarm", "node", "new", "status", "config", "identity", "prometheus-targets", "version", "expert", "router")


class _Ordered(typer.core.TyperGroup):
    """`atoll --help` lists commands in the order a newcomer needs them, not as registered."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


SWARM_HINT = (
    "if your nodes use another net.swarm, name it with --swarm NAME (the examples use demo, lab, mylab, mixed)"
)

app = typer.Typer(
    help="atoll: a peer-to-peer training daemon.", no_args_is_help=True, add_completion=False, cls=_Ordered
)
bench_app = typer.Typer(
    help="Benchmarks that compare atoll against baselines measured in the same run.", no_args_is_help=True
)
identity_app = typer.Typer(help="The node's Ed25519 identity (its libp2p peer id).", no_args_is_help=True)
node_app = typer.Typer(help="Run one node daemon.", no_args_is_help=True)
swarm_app = typer.Typer(help="Run a whole swarm on this machine (loopback) to try atoll.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
expert_app = typer.Typer(
    help="Decentralized diffusion experts: one per data cluster, trained in isolation.", no_args_is_help=True
)
router_app = typer.Typer(help="The router that samples images from the live experts' ensemble.", no_args_is_help=True)
new_app = typer.Typer(help="Start something of your own from a template.", no_args_is_help=True)
# help panels, in the order a newcomer needs them
TRAIN, INSPECT, EXPERTS, MEASURE = "Train", "Inspect", "Diffusion experts", "Measure"
app.add_typer(swarm_app, name="swarm", rich_help_panel=TRAIN)
app.add_typer(node_app, name="node", rich_help_panel=TRAIN)
app.add_typer(new_app, name="new", rich_help_panel=TRAIN)
app.add_typer(config_app, name="config", rich_help_panel=INSPECT)
app.add_typer(identity_app, name="identity", rich_help_panel=INSPECT)
app.add_typer(expert_app, name="expert", rich_help_panel=EXPERTS)
app.add_typer(router_app, name="router", rich_help_panel=EXPERTS)
app.add_typer(bench_app, name="bench", rich_help_panel=MEASURE)

SET_HELP = "Override a config field, e.g. --set train.rounds=20 --set data.alpha=0.1 (repeatable)."

# The options of every command that joins a swarm (node start, expert train --serve, router
# serve): one definition, so the commands cannot drift apart.
PEERS_OPTION = typer.Option([], "--initial-peers", "-p", help="Multiaddr of a swarm member (repeatable).")
IDENTITY_OPTION = typer.Option(None, "--identity", help="Node key file (created on first start); net.identity_path.")


def _join_overrides(initial_peers: list[str], identity: Path | None, **more) -> dict:
    """Config overrides from the joining options (None: not given, keep the config's)."""
    extra = {"net.identity_path": str(identity) if identity else None, **more}
    if initial_peers:
        extra["net.initial_peers"] = list(initial_peers)
    return extra


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM handler of a long-running command: the first signal calls
    `target` (finish the step, checkpoint, leave) and says so; a second one quits at once
    (hivemind's children notice and stop themselves, see p2pd/procs.py). Before `target` is
    set, nothing has started and the first signal just exits."""

    def __init__(self, target=None, message: str = "stopping after the current step"):
        import signal

        self.target, self.count, self.message = target, 0, message
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum: int, frame) -> None:
        """Signal handler: the first signal asks the target to stop after the current step, a second exits at once."""
        import os
        import signal

        self.count += 1
        if self.target is None:
            raise SystemExit(128 + signum)
        if self.count > 1:
            os._exit(128 + signum)
        # os.write: print() is not safe here if the main thread was interrupted mid-write
        os.write(2, f"\n{signal.Signals(signum).name}: {self.message} (again to quit at once)\n".encode())
        self.target()


def _load(config: Path | None, sets: list[str], extra: dict | None = None):
    from node.config import ConfigError, load_config, parse_override

    try:
        overrides = dict(parse_override(s) for s in sets)
        overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


@config_app.command("show")
def config_show(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the effective configuration (defaults, then the file, then --set)."""
    from node.config import dump_config

    typer.echo(dump_config(_load(config, set_)), nl=False)


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
    extra = _join_overrides(
        initial_peers,
        identity,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        metrics_port=metrics_port,
    )
    cfg = _load(config, set_, extra)
    if cfg.role != "trainer":
        _run_role(cfg, json_events)
        return
    stopper = GracefulStop()
    logging.getLogger().setLevel(cfg.log_level)
    from node.net.daemon import Node
    from p2pd.discovery import DiscoveryError
    from p2pd.identity import IdentityError

    node = Node(cfg, on_event=_json_event if json_events else _human_event)
    stopper.target = node.request_stop
    try:
        summary = node.run()
    except (DiscoveryError, IdentityError, OSError, RuntimeError, ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if summary["event"] == "stopped":
        raise typer.Exit(0)


def _run_role(cfg, json_events: bool, serve: bool = True) -> dict:
    """Run an expert or router node in the foreground until done or SIGTERM / Ctrl-C."""
    stopper = GracefulStop()
    from node.net.checkpoint import CheckpointError
    from node.net.experts.roles import ExpertNode, RouterNode
    from p2pd.discovery import DiscoveryError
    from p2pd.identity import IdentityError

    logging.getLogger().setLevel(cfg.log_level)
    emit = _json_event if json_events else _role_event
    try:
        node = ExpertNode(cfg, emit) if cfg.role == "expert" else RouterNode(cfg, emit)
        stopper.target = node.request_stop
        result = node.run(serve) if cfg.role == "expert" else node.run()
    except (DiscoveryError, IdentityError, CheckpointError, OSError, RuntimeError, ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    emit(result)
    return result


def _role_event(e: dict) -> None:
    from node.app import console

    kind = e["event"]
    if kind == "expert":
        typer.echo(f"expert of cluster {e['cluster']} of {e['clusters']}: training on {e['images']} images")
    elif kind == "train":
        typer.echo(f"{e['role']} step {e['step']:>6}/{e['steps']}  loss {e['loss']:.4f}  {e['seconds']:.0f}s")
    elif kind == "trained":
        typer.echo(f"{e['role']} trained: {e['steps']} steps, loss {e['loss']:.4f}, {e['seconds']:.0f}s")
    elif kind == "ready":
        what = f"expert of cluster {e['cluster']}" if e["role"] == "expert" else "router"
        for line in console.ready_lines(
            e, what, f"atoll {'expert train' if e['role'] == 'expert' else 'router serve'} ..."
        ):
            typer.echo(line)
        typer.echo(f"{what} serving on {e['grpc']} (Ctrl-C stops it)")
    elif kind == "done":
        typer.echo(f"expert of cluster {e['cluster']} done, checkpoint {e['checkpoint'][:16]}")
    elif kind == "stopped":
        where = f" at step {e['step']} (checkpointed)" if "step" in e else ""
        typer.echo(f"stopped{where}")
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in e.items()))


def _json_event(e: dict) -> None:
    print(json.dumps(e), flush=True)


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


@new_app.command("task")
def new_task(
    name: str = typer.Argument(..., metavar="NAME", help="Name of the task: NAME.py and NAME.yaml are written."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to write them."),
) -> None:
    """Write NAME.py (a task: model, data, loss, metrics; see node/task) and NAME.yaml (a
    3-node swarm on it). Then: `atoll swarm up -c NAME.yaml` from that folder."""
    import importlib.util

    if not name.isidentifier():
        _fail(f"task name {name!r} must be a Python identifier (letters, digits, _)")
    code, swarm_file = directory / f"{name}.py", directory / f"{name}.yaml"
    existing = [str(p) for p in (code, swarm_file) if p.exists()]
    if existing:
        _fail(f"{', '.join(existing)} already exist: choose another name or folder")
    template = Path(importlib.util.find_spec("node.task.template").origin).read_text()
    directory.mkdir(parents=True, exist_ok=True)
    code.write_text(template.replace("NAME", name))
    swarm_file.write_text(
        f"# A 3-node swarm on your task: atoll swarm up -c {name}.yaml (task paths: relative to this file)\n"
        "nodes: 3\n"
        "node:\n"
        f"  task: ./{name}.py:task\n"
        "  task_config: {dim: 20, per_node: 16}\n"
        "  optim: {name: sgd, lr: 0.02, momentum: 0.9, batch_size: 8, schedule: constant}\n"
        "  train: {rounds: 30, local_steps: 5}\n"
        f"  net: {{swarm: {name}}}\n"
    )
    typer.echo(f"wrote {code} and {swarm_file}; run it with: atoll swarm up -c {swarm_file}")


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
        _fail(str(e))
    base = scfg.node
    if base.task is not None:  # a broken task is one line here, not a node that exits
        from node.protocol.data import DatasetMissing
        from node.protocol.worker import Worker
        from node.task import TaskError

        try:
            Worker(scfg.config_for(0))  # the task's hooks run once, as each node will run them
        except (TaskError, ConfigError, DatasetMissing) as e:
            _fail(str(e))
    wd = workdir or Path(tempfile.mkdtemp(prefix="atoll-swarm-"))
    try:
        swarm.check_workdir(wd)
        swarm.node_configs(scfg, wd)  # every --set applies to N nodes on one host, or one line says why not
        if out is not None and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
    except ValueError as e:
        _fail(str(e))
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
            _fail(str(e))
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


@app.command(rich_help_panel=INSPECT)
def status(
    peers: list[str] = typer.Option(..., "--peers", "-p", help="Multiaddr of any swarm member (repeatable)."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name (the DHT key atoll/<swarm>/peers)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
    wait: float = typer.Option(2.0, min=0.0, help="Seconds to let the DHT settle before reading."),
) -> None:
    """The swarm as the DHT sees it: every live node's signed record."""
    with _observer(peers, swarm_name) as d:
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
        _fail("--initial-peers and --identity join a swarm: add --serve (training alone needs no swarm)")
    extra = _join_overrides(
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
    _run_role(_load(config, set_, extra), json_events, serve=serve)


@router_app.command("serve")
def router_serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    initial_peers: list[str] = PEERS_OPTION,
    identity: Path | None = IDENTITY_OPTION,
    checkpoint_dir: Path | None = typer.Option(None, help="The router's checkpoint goes to DIR/router."),
    json_events: bool = typer.Option(False, "--json-events", help="Print progress as JSON lines."),
) -> None:
    """Train (or load) the router p(cluster | x_t, t), join the swarm and serve ensemble
    sampling over the experts live in the DHT (the same as `atoll node start --set role=router`)."""
    extra = _join_overrides(
        initial_peers, identity, role="router", checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None
    )
    _run_role(_load(config, set_, extra), json_events)


@router_app.command("query")
def router_query(
    router: str | None = typer.Option(None, help="The router's gRPC host:port."),
    peers: list[str] = typer.Option([], "--peers", "-p", help="Or: a swarm member's multiaddr, to find a router."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name (with --peers)."),
    n: int = typer.Option(16, min=1, help="Images to sample."),
    strategy: str = typer.Option("top1", help="top1, top2, ..., or full."),
    seed: int = typer.Option(0, min=0),
    steps: int = typer.Option(0, min=0, help="Euler steps (0: the router's default)."),
    out: Path | None = typer.Option(None, help="Write the images as a PNG grid here."),
    timeout: float = typer.Option(300.0, min=1.0, help="Seconds to wait for the answer."),
    as_json: bool = typer.Option(False, "--json", help="Print which experts served each image as JSON."),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="For a router serving TLS (net.tls_cert): the CA certificate that signed its cert."
    ),
) -> None:
    """Ask a router for images; prints which experts served each one."""
    import grpc

    from node.net.experts.service import matrix_from_pb
    from p2pd.client import open_channel
    from p2pd.rpc import router_pb2 as rpb
    from p2pd.rpc import router_pb2_grpc as rpb_grpc
    from p2pd.server import TLSConfig

    address = router or _find_router(peers, swarm_name)
    tls = TLSConfig(ca_file=tls_ca) if tls_ca else None
    if tls_ca is not None and not tls_ca.is_file():
        _fail(f"--tls-ca {tls_ca}: no such file")
    with open_channel(address, [("grpc.max_receive_message_length", 64 * 2**20)], tls) as ch:
        try:
            reply = rpb_grpc.RouterStub(ch).Sample(
                rpb.SampleRequest(n=n, strategy=strategy, seed=seed, steps=steps), timeout=timeout
            )
        except grpc.RpcError as e:
            _fail(f"router {address}: {e.code().name}: {e.details()}")
    shape = tuple(reply.image_shape)
    try:
        if len(shape) != 3:
            raise ValueError(f"image shape {shape}")
        images = matrix_from_pb(reply.images, shape[0] * shape[1] * shape[2], max_rows=n)
    except ValueError as e:
        _fail(f"router {address} sent a bad reply: {e}")
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


def _find_router(peers: list[str], swarm_name: str) -> str:
    if not peers:
        _fail("give --router HOST:PORT or --peers MADDR")
    with _observer(peers, swarm_name) as d:
        for _ in range(20):  # bounded: 10 s for the DHT to answer
            live = d.live_peers()
            routers = [r for r in live if "router" in r.roles]
            if routers:
                return routers[0].grpc_address
            time.sleep(0.5)
    if live:
        _fail(f"no live router in swarm {swarm_name!r} ({len(live)} live node(s), none a router: atoll router serve)")
    _fail(f"no live node in swarm {swarm_name!r}: {SWARM_HINT}")


@app.command("prometheus-targets", rich_help_panel=INSPECT)
def prometheus_targets(
    peers: list[str] = typer.Option(..., "--peers", "-p", help="Multiaddr of any swarm member (repeatable)."),
    out: Path = typer.Option(..., help="The file_sd JSON file Prometheus reads (replaced atomically)."),
    swarm_name: str = typer.Option("atoll", "--swarm", help="Swarm name."),
    every: float = typer.Option(0.0, min=0.0, help="Rewrite every this many seconds until stopped (0: once)."),
    wait: float = typer.Option(2.0, min=0.0, help="Seconds to let the DHT settle before the first read."),
) -> None:
    """Write Prometheus file_sd targets (every live node's metrics endpoint) from the DHT, so
    Prometheus follows the swarm as nodes join and leave."""
    import threading

    from node.app.prometheus_sd import targets, write_atomic
    from p2pd.discovery import DiscoveryError

    stop = threading.Event()
    GracefulStop(stop.set)
    with _observer(peers, swarm_name) as d:
        stop.wait(wait)
        while True:
            try:
                groups = targets(d.live_peers(), swarm_name)
                write_atomic(out, groups)
                typer.echo(f"{len(groups)} target(s) -> {out}", err=True)
            except DiscoveryError as e:  # keep the last good file; try again next time
                typer.echo(f"warning: {e}", err=True)
            except OSError as e:
                _fail(f"cannot write {out}: {e}")
            if not every or stop.wait(every):
                break


@contextlib.contextmanager
def _observer(peers: list[str], swarm_name: str):
    """A client-mode DHT member with a throwaway identity, for commands that only read the
    swarm's records; a bad multiaddr or an unreachable swarm is one error line."""
    import tempfile

    from p2pd.addresses import check_maddr
    from p2pd.discovery import Discovery, DiscoveryError
    from p2pd.identity import Identity

    with tempfile.TemporaryDirectory() as tmp:
        try:
            peers = [check_maddr(p) for p in peers]
            d = Discovery(
                Identity.load_or_create(Path(tmp) / "observer.key"),
                swarm=swarm_name,
                initial_peers=peers,
                client_mode=True,
            ).start()
        except (DiscoveryError, ValueError) as e:
            _fail(str(e).splitlines()[0])
        try:
            yield d
        finally:
            d.close()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _int_list(text: str, option: str, lo: int, hi: int) -> list[int]:
    """A comma-separated list of integers in [lo, hi], or one clear error line."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"{option} must be comma-separated integers, got {text!r}")
    if not values or any(not lo <= v <= hi for v in values):
        _fail(f"{option} must list integers between {lo} and {hi}")
    return values


@app.command(rich_help_panel=INSPECT)
def version() -> None:
    """Print the atoll version."""
    typer.echo(__version__)


@identity_app.command("show")
def identity_show(
    key: Path = typer.Option(Path("~/.atoll/node.key"), help="Key file; created (mode 0600) if missing."),
) -> None:
    """Print the peer id of the key at KEY, creating the key on first use."""
    from p2pd.identity import Identity, IdentityError

    try:
        identity = Identity.load_or_create(key)
    except (IdentityError, OSError) as e:
        _fail(str(e))
    typer.echo(identity.peer_id)


@bench_app.command("transport")
def bench_transport(
    sizes: str = typer.Option("10,100,400", help="State dict sizes in MiB, comma-separated."),
    repeats: int = typer.Option(3, min=1, max=20, help="Runs per path and size; the best is reported."),
    skip_hivemind: bool = typer.Option(False, "--skip-hivemind", help="Leave out hivemind's libp2p stream (slowest)."),
    only: str = typer.Option(
        "", "--paths", help="Only these paths, comma-separated (e.g. grpc_raw,atoll,atoll_libp2p); default: all."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON instead of a table."),
    out: Path | None = typer.Option(None, help="Also write results.json, table.md and transport.png here."),
) -> None:
    """Snapshot exchange throughput (GB/s) on loopback: atoll's gRPC path, raw and with each
    codec (effective GB/s of float32 state) and over libp2p (the path to a node behind NAT),
    vs a bare gRPC byte stream, hivemind's libp2p stream, and an in-process copy (the physical
    limit)."""
    from node.app.bench import transport

    size_list = _int_list(sizes, "--sizes", 1, 4096)
    paths = tuple(p for p in transport.PATHS if not (skip_hivemind and p == "hivemind"))
    if only:
        wanted = [p.strip() for p in only.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in transport.PATHS]
        if unknown:
            _fail(f"--paths: unknown {', '.join(unknown)}; known: {', '.join(transport.PATHS)}")
        paths = tuple(p for p in paths if p in wanted)

    def progress(row):
        typer.echo(f"  {row.size_mb:>5} MiB  {row.path:<12} {row.gbps:7.3f} GB/s", err=True)

    typer.echo(f"bench transport: sizes {size_list} MiB, best of {repeats}, paths {', '.join(paths)}", err=True)
    rows = transport.run(size_list, repeats=repeats, paths=paths, progress=progress)
    if as_json:
        typer.echo(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        typer.echo(transport.table(rows))
    if out is not None:
        meta = {"sizes_mib": size_list, "repeats": repeats, "command": " ".join(["atoll", *sys.argv[1:]])}
        for path in transport.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("algorithms")
def bench_algorithms(
    nodes: int = typer.Option(16, min=2, max=1024, help="Virtual nodes."),
    dataset: str = typer.Option("digits", help="digits or fashion-mnist."),
    alpha: float = typer.Option(0.1, min=0.001, help="Dirichlet alpha of the partition."),
    rounds: int = typer.Option(20, min=1, max=10000),
    local_steps: int = typer.Option(10, min=1, help="Local SGD steps per node per round (equal for all methods)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    methods: str = typer.Option(
        "all",
        help="Comma-separated method names, or all: centralized, fedavg, dpsgd, "
        "mgs_q4, dfedsam_mgs_q4, late_merge, constant_merge, modest_50, modest_80, "
        "indep_mean, indep_varcorr, indep_dpsgd, indep_dpsgd_varcorr, frl.",
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and accuracy.png here."),
) -> None:
    """Schedules and algorithms (D-PSGD, MGS, DFedSAM, late-concentrated + final merge, MoDeST,
    variance-corrected merging) against centralized training and FedAvg, in the simulator."""
    from rich.progress import Progress

    from node.app.bench import algorithms as alg

    seed_list = _int_list(seeds, "--seeds", 0, 2**31)
    names = list(alg.methods(rounds)) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in alg.methods(rounds)]
    if unknown:
        _fail(f"unknown methods {unknown}; available: {', '.join(alg.methods(rounds))}")
    base = _bench_node(dataset, alpha, rounds, local_steps)
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=len(names) * len(seed_list))
        rows = _simulated(lambda: alg.run(nodes, base, names, seed_list, progress=lambda row: bar.advance(task)))
    typer.echo(alg.table(alg.summarize(rows)))
    if out is not None:
        meta = {"command": " ".join(["atoll", *sys.argv[1:]]), "title": f"{nodes} nodes, {dataset}, alpha {alpha}"}
        for path in alg.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("compression")
def bench_compression(
    workloads: str = typer.Option(
        "all", help="Comma-separated, or all: digits-mlp, fashion-cnn, kjv-lm, fortunes-lora."
    ),
    methods: str = typer.Option(
        "all",
        help="Comma-separated, or all: float32, fp16, bf16, int8, topk10%, topk5%, topk1%, each also with +ef.",
    ),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    consensus_step: float | None = typer.Option(
        None, min=0.001, max=1.0, help="CHOCO step size gamma for every codec (default: comm.consensus_step's)."
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and compression.png here."),
) -> None:
    """Quality against bytes sent for every codec (float32, fp16, bf16, int8, top-k), with and
    without error feedback (CHOCO-SGD), on digits, Fashion-MNIST, the KJV language model and its
    LoRA fine-tune, in the simulator (the daemons' codecs and wire bytes)."""
    from rich.progress import Progress

    from node.app.bench import compression as comp

    seed_list = _int_list(seeds, "--seeds", 0, 2**31)
    work = _names(workloads, "--workloads", comp.WORKLOADS)
    names = _names(methods, "--methods", comp.methods())
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=len(work) * len(names) * len(seed_list))
        rows = _simulated(
            lambda: comp.run(
                work, names, seed_list, consensus_step=consensus_step, progress=lambda r: bar.advance(task)
            )
        )
    summary = comp.summarize(rows)
    typer.echo(comp.table(summary))
    typer.echo("\n".join(comp.targets(summary)))
    if out is not None:
        meta = {"command": " ".join(["atoll", *sys.argv[1:]]), "title": "compressed gossip, 4 nodes on a ring"}
        for path in comp.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("distill")
def bench_distill(
    nodes: int = typer.Option(8, min=2, max=256, help="Virtual nodes; they cycle through the architectures."),
    architectures: str = typer.Option("mlp:64,mlp:256,cnn:32", help="Comma-separated family:width models."),
    dataset: str = typer.Option("digits", help="digits or fashion-mnist."),
    alpha: float = typer.Option(0.1, min=0.001, help="Dirichlet alpha of the partition."),
    rounds: int = typer.Option(30, min=1, max=10000),
    local_steps: int = typer.Option(20, min=1, help="Local SGD steps per node per round (equal for all methods)."),
    distill_steps: int = typer.Option(20, min=1, help="Distillation steps per round on the proxy set."),
    proxy_size: int = typer.Option(300, min=10, help="Unlabeled proxy samples, taken out of the training split."),
    topology: str = typer.Option(
        "ring", help="Graph of the logit exchange: ring, torus, exponential, random or complete."
    ),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    methods: str = typer.Option(
        "all",
        help="Comma-separated method names, or all: isolated, edgefd, knfu, edgefd+knfu, fedd2s "
        "(and fedd2s_drop0, fedd2s_drop0.05, fedd2s_drop0.2), gossip_same_arch, and centralized_ARCH "
        "and fedavg_ARCH (every node running ARCH) for each architecture.",
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and accuracy.png here."),
) -> None:
    """Federated distillation (EdgeFD, KnFu, FedD2S) on a mixed-architecture swarm against
    isolated training, model gossip within each architecture and centralized training, in the
    simulator; each node's accuracy on its own distribution (20% of its share held out) beside
    the global test accuracy."""
    from rich.progress import Progress

    from node.app.bench import distill
    from node.protocol.models import FAMILIES

    archs = [a.strip() for a in architectures.split(",") if a.strip()]
    for a in archs:
        family, _, width = a.partition(":")
        if family not in FAMILIES or not width.isdigit() or not 4 <= int(width) <= 8192:
            _fail(f"--architectures: {a!r} is not family:width with family in {', '.join(FAMILIES)} and width 4..8192")
    _topology_or_fail(topology)
    seed_list = _int_list(seeds, "--seeds", 0, 2**31)
    table = distill.methods(rounds, archs)
    names = list(table) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        _fail(f"unknown methods {unknown}; available: {', '.join(table)}")
    base = _bench_node(
        dataset,
        alpha,
        rounds,
        local_steps,
        comm={"topology": topology},
        distill={"steps": distill_steps, "proxy_size": proxy_size},
    )
    base["data"] = {**base["data"], "personal_holdout": 0.2}
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=len(names) * len(seed_list))
        rows = _simulated(
            lambda: distill.run(nodes, base, archs, names, seed_list, progress=lambda row: bar.advance(task))
        )
    typer.echo(distill.table(distill.summarize(rows), archs))
    if out is not None:
        meta = {
            "command": " ".join(["atoll", *sys.argv[1:]]),
            "title": f"{nodes} nodes ({', '.join(archs)}), {dataset}, alpha {alpha}, {topology}",
        }
        for path in distill.write_outputs(rows, out, meta, archs):
            typer.echo(f"wrote {path}", err=True)


def _bench_node(dataset: str, alpha: float, rounds: int, local_steps: int, **sections) -> dict:
    """Nested NodeConfig overrides shared by every method of a simulated benchmark."""
    tree = {"data": {"dataset": dataset, "alpha": alpha}, "train": {"rounds": rounds, "local_steps": local_steps}}
    return {**tree, **sections}


def _simulated(run):
    """run(), with a config or data problem as one line (e.g. a proxy set larger than the data).
    The virtual nodes' own warnings (flagged peers) are left to the tables."""
    from node.config import ConfigError
    from node.protocol.data import DatasetMissing

    logging.getLogger("atoll").setLevel(logging.ERROR)

    try:
        return run()
    except (ConfigError, DatasetMissing, ValueError) as e:
        _fail(str(e).splitlines()[0])


def _topology_or_fail(name: str) -> None:
    from node.algo.comm.topology import KINDS

    if name not in KINDS:
        _fail(f"--topology: unknown {name!r}; available: {', '.join(KINDS)}")


def _names(text: str, option: str, available) -> list[str]:
    names = list(available) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        _fail(f"{option}: unknown {unknown or text!r}; available: {', '.join(available)}")
    return names


@bench_app.command("byzantine")
def bench_byzantine(
    honest: int = typer.Option(16, min=2, max=256, help="Honest nodes in the main grid."),
    fraction: float = typer.Option(0.25, min=0.0, max=0.49, help="Byzantine share of the swarm (at least)."),
    sybils: int = typer.Option(10, min=1, max=256, help="Sybil identities in the sybil run."),
    sybil_honest: int = typer.Option(6, min=2, max=256, help="Honest nodes in the sybil run."),
    attacks: str = typer.Option("all", help="Comma-separated attacks, or all."),
    aggregators: str = typer.Option("all", help="Comma-separated aggregators, or all."),
    dataset: str = typer.Option("digits", help="digits or fashion-mnist."),
    alpha: float = typer.Option(0.5, min=0.001, help="Dirichlet alpha of the partition."),
    rounds: int = typer.Option(20, min=1, max=10000),
    local_steps: int = typer.Option(10, min=1, help="Local SGD steps per node per round."),
    topology: str = typer.Option("complete", help="ring, torus, exponential, random or complete."),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds."),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and accuracy.png here."),
) -> None:
    """Every attack (label flip, sign flip, Gaussian, ALIE, IPM, free riding, sybils, reverse)
    against every aggregator (mean, median, trimmed mean, Krum, ClippedGossip, SybilWall,
    Bristle) and FRL's rank voting (frl), plus a sybil run, with the trust score's detection
    precision and recall, in the simulator."""
    from rich.progress import Progress

    from node.algo.security.attacks import ATTACKS
    from node.app.bench import byzantine

    atk = _names(attacks, "--attacks", ATTACKS)
    agg = _names(aggregators, "--aggregators", byzantine.DEFENCES)
    _topology_or_fail(topology)
    seed_list = _int_list(seeds, "--seeds", 0, 2**31)
    n_byz = byzantine.byzantine_count(honest, fraction)
    base = _bench_node(dataset, alpha, rounds, local_steps, comm={"topology": topology})
    runs = len(list(byzantine.cases(honest, n_byz, sybils, sybil_honest, atk, agg))) * len(seed_list)
    typer.echo(
        f"bench byzantine: {honest} honest + {n_byz} byzantine; sybil run {sybils} vs {sybil_honest}; "
        f"{runs} simulations",
        err=True,
    )
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=runs)
        rows = _simulated(
            lambda: byzantine.run(
                base, seed_list, honest, n_byz, sybils, sybil_honest, atk, agg, progress=lambda row: bar.advance(task)
            )
        )
    typer.echo(byzantine.tables(byzantine.summarize(rows), agg))
    if out is not None:
        meta = {
            "command": " ".join(["atoll", *sys.argv[1:]]),
            "title": f"{honest} honest + {n_byz} byzantine, {dataset}, alpha {alpha}, {topology}, {rounds} rounds",
        }
        for path in byzantine.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("experts")
def bench_experts(
    clusters: int = typer.Option(4, min=2, max=16, help="K: clusters, one expert each."),
    steps: int = typer.Option(1500, min=1, help="Training steps per expert (the monolith gets K times as many)."),
    router_steps: int = typer.Option(2000, min=1, help="Router training steps."),
    width: int = typer.Option(256, min=8, max=4096, help="Hidden width of every net."),
    samples: int = typer.Option(1000, min=20, max=10000, help="Images sampled per method and seed."),
    sample_steps: int = typer.Option(50, min=1, max=1000, help="Euler steps per sample."),
    dataset: str = typer.Option("digits", help="digits or fashion-mnist."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    out: Path | None = typer.Option(None, help="Write results.json, table.md, frechet.png and a grid per method."),
) -> None:
    """Decentralized diffusion in miniature: K experts trained in isolation on KMeans clusters vs a
    monolith at equal total training compute, sampled with top-1, top-2 and full routing, scored
    by a classifier trained in the same run; plus router throughput with experts in process vs
    behind gRPC on 127.0.0.1."""
    from node.app.bench import experts as bench

    seed_list = _int_list(seeds, "--seeds", 0, 2**31)
    if dataset not in ("digits", "fashion-mnist"):
        _fail(f"--dataset: unknown {dataset!r}")
    note = lambda s: typer.echo(s, err=True)  # noqa: E731
    from node.protocol.data.datasets import DatasetMissing

    try:
        rows, infos, judge_acc = bench.run(
            dataset, clusters, steps, router_steps, width, samples, sample_steps, seed_list, out, note
        )
    except (DatasetMissing, OSError) as e:
        _fail(str(e))
    typer.echo(bench.tables(bench.summarize(rows), infos))
    if out is not None:
        meta = {
            "command": " ".join(["atoll", *sys.argv[1:]]),
            "title": f"{clusters} experts vs monolith, {dataset}, {steps} steps per expert, {len(seed_list)} seeds",
        }
        for path in bench.write_outputs(rows, infos, judge_acc, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("swarm")
def bench_swarm(
    config: Path = typer.Option(Path("examples/swarm4.yaml"), "--config", "-c", help="Swarm YAML (the demo's)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every node."),
    repeats: int = typer.Option(3, min=1, max=20, help="Alternated runs of each system; medians are reported."),
    target: float = typer.Option(0.93, min=0.1, max=1.0, help="Accuracy every node must reach."),
    systems: str = typer.Option("atoll,flower", help="Systems to run, comma-separated: atoll, flower."),
    flower_venv: Path | None = typer.Option(
        None, help="Flower's own virtual environment (default ~/.cache/atoll/flower-venv, created on first use)."
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and swarm.png here."),
) -> None:
    """The same task run by an atoll swarm and by Flower FedAvg, alternated on this machine:
    per-round time, time to a target accuracy on every node, launch to first round, bytes, CPU
    and peak memory per node, as medians and ratios to atoll."""
    from node.app.bench import swarm as bench
    from node.config import ConfigError, load_swarm_config, parse_override

    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [s for s in chosen if s not in bench.SYSTEMS]
    if not chosen or unknown or "atoll" not in chosen:
        _fail(f"--systems takes atoll and any of {', '.join(bench.SYSTEMS[1:])}; got {systems!r}")
    try:
        scfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
    except ConfigError as e:
        _fail(str(e))
    typer.echo(f"bench swarm: {scfg.nodes} nodes, {', '.join(chosen)}, {repeats} alternated repeats", err=True)
    try:
        runs = bench.run(scfg, repeats, target, chosen, flower_venv, progress=lambda m: typer.echo(m, err=True))
    except (bench.BenchError, RuntimeError, TimeoutError) as e:
        _fail(str(e))
    typer.echo(bench.table(runs, target))
    if out is not None:
        meta = {"command": " ".join(["atoll", *sys.argv[1:]]), "target": target, "repeats": repeats}
        for path in bench.write_outputs(runs, out, meta, target):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("task")
def bench_task(
    config: Path = typer.Option(..., "--config", "-c", help="Swarm YAML of the task (e.g. examples/kjv4.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every node."),
    seeds: str = typer.Option("0,1,2", help="Seeds (train.seed and data.seed), comma-separated."),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and curve.png here."),
) -> None:
    """A task's swarm (simulated through the daemons' round engine) against its nodes trained
    alone and a centralized model with the same steps, over seeds: the task's metric."""
    from node.app.bench import task as bench
    from node.config import ConfigError, load_swarm_config, parse_override
    from node.protocol.worker import NonFinite
    from node.task import TaskError

    seed_list = _int_list(seeds, "--seeds", 0, 2**31 - 1)
    try:
        scfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
        typer.echo(f"bench task: {scfg.nodes} nodes, {scfg.node.task or 'built-in'}, seeds {seed_list}", err=True)
        rows = bench.run(scfg, seed_list, progress=lambda m: typer.echo(m, err=True))
    except (ConfigError, TaskError, ArithmeticError, RuntimeError, ValueError, NonFinite) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    typer.echo(bench.table(rows))
    if out is not None:
        meta = {"command": " ".join(["atoll", *sys.argv[1:]]), "title": f"{rows[0].metric}: {config.name}"}
        for path in bench.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


@bench_app.command("scale")
def bench_scale(
    sizes: str = typer.Option("16,64,256", help="Numbers of virtual nodes, comma-separated."),
    rounds: int = typer.Option(20, min=1, max=10000),
    local_steps: int = typer.Option(10, min=1),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and scale.png here."),
) -> None:
    """Simulator seconds per round and peak memory against the number of virtual nodes."""
    from node.app.bench import scale

    size_list = _int_list(sizes, "--sizes", 2, 4096)
    try:
        rows = scale.run(
            size_list,
            rounds,
            local_steps,
            progress=lambda r: typer.echo(f"  {r['nodes']} nodes: {r['seconds_per_round']:.2f} s/round", err=True),
        )
    except RuntimeError as e:
        _fail(str(e))
    typer.echo(scale.table(rows))
    if out is not None:
        meta = {"command": " ".join(["atoll", *sys.argv[1:]])}
        for path in scale.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


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


if __name__ == "__main__":
    main()

"""`atoll bench wan`: atoll, Flower and torchft on a testbed of shaped links (a command of the `bench` group)."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.bench import bench_app, report
from node.app.cli.common import SET_HELP, fail, int_list, names_or_fail

SYSTEMS = ("atoll", "flower", "torchft")
# node.app.bench.wan_report.atoll_methods' names (tests/test_cli_bench_wan.py keeps them equal; that module is
# imported only when a benchmark runs)
METHODS = (
    "gossip",
    "late_merge",
    "choco_int8",
    "choco_topk",
    "diloco",
    "diloco_topk2bit",
    "diloco_allreduce",
    "diloco_streamed",
    "diloco_streamed_topk2bit",
)


@bench_app.command("wan")
def bench_wan(
    config: Path = typer.Option(Path("examples/wan3.yaml"), "--config", "-c", help="Swarm YAML of the workload."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every node."),
    profile: str = typer.Option("home3", help="Link profile: home3, even20 or mixed7 (node/app/testbed/profiles.py)."),
    methods: str = typer.Option(",".join(METHODS[:4]), help="atoll's methods, comma-separated: " + ", ".join(METHODS)),
    systems: str = typer.Option("atoll,flower,torchft", help="Systems, comma-separated: " + ", ".join(SYSTEMS)),
    repeats: int = typer.Option(3, min=1, max=20, help="Alternated repeats; medians are reported."),
    target_ratio: float = typer.Option(
        1.1, min=0.1, max=10.0, help="Target: this times the centralized model's metric (perplexity: above 1)."
    ),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and wan.png here."),
) -> None:
    """atoll's algorithms (gossip every round, the late schedule with the final merge, CHOCO with int8 and with
    top-k plus error feedback), Flower FedAvg and torchft's DiLoCo on one testbed of network namespaces whose
    hosts have the profile's uplink and downlink rates (needs root and `tc`), alternated: time to the target on
    every node, compute utilization, MB per node, final metric; and the simulator's link model predicting atoll's
    gossip runs beside their measurement."""
    from node.app.bench import wan_report
    from node.app.bench.swarm import BenchError
    from node.app.testbed.namespaces import unavailable
    from node.app.testbed.profiles import PROFILES
    from node.config import ConfigError, load_swarm_config, parse_override

    if profile not in PROFILES:
        fail(f"--profile: unknown {profile!r}; known: {', '.join(PROFILES)}")
    method_list = names_or_fail(methods, "--methods", METHODS)
    system_list = names_or_fail(systems, "--systems", SYSTEMS)
    if "atoll" not in system_list:
        method_list = []
    try:
        cfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
    except ConfigError as e:
        fail(str(e))
    reason = unavailable("tc")
    if reason:
        fail(f"the testbed cannot be built here: {reason}")
    pythons = {}
    try:
        if "flower" in system_list:
            from node.app.bench.swarm import flower_python
            from node.app.bench.venvs import CACHE

            pythons["flower"] = flower_python(CACHE / "flower-venv", lambda m: typer.echo(m, err=True))
        if "torchft" in system_list:
            from node.app.bench.torchft_env import torchft_python

            pythons["torchft"] = torchft_python(progress=lambda m: typer.echo(m, err=True))
        typer.echo(f"bench wan: {cfg.nodes} nodes on profile {profile}, {repeats} alternated repeats", err=True)
        workdir = (out or Path("out/bench-wan")) / "runs"
        rep = wan_report.run(
            cfg, profile, method_list, system_list, repeats, workdir, target_ratio, pythons,
            progress=lambda m: typer.echo(m, err=True),
        )  # fmt: skip
    except (BenchError, RuntimeError, TimeoutError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    typer.echo(wan_report.table(rep))
    from node.app.testbed.testbed import netem_missing

    no_netem = netem_missing()
    latency = f"none added: {no_netem}" if no_netem else "none added (netem is available; profiles set rates only)"
    meta = {"profile": profile, "repeats": repeats, "nodes": cfg.nodes, "config": str(config), "latency": latency}
    report(out, meta, lambda out, meta: wan_report.write_outputs(rep, out, meta))


@bench_app.command("predict")
def bench_predict(
    config: Path = typer.Option(Path("examples/swarm4.yaml"), "--config", "-c", help="Swarm YAML of the workload."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every node."),
    nodes: str = typer.Option("64,256,1024", help="Swarm sizes, comma-separated."),
    profile: str = typer.Option("mixed7", help="Link profile, its host classes repeated to each size."),
    step_seconds: float | None = typer.Option(
        None, min=1e-6, help="Seconds per local step (default: measured here for the workload, one thread)."
    ),
    idle_seconds: float = typer.Option(0.0, min=0.0, help="Seconds between rounds (evaluation, checkpoints)."),
    target: float = typer.Option(0.9, min=0.0, max=1.0, help="Accuracy every node must reach."),
    out: Path | None = typer.Option(None, help="Write results.json and table.md here."),
) -> None:
    """Predicted wall time, compute utilization and time to a target accuracy for large swarms on heterogeneous
    links: the simulator runs the swarm and the link model replays what every node did on the profile's links."""
    from node.app.bench import predict as bench
    from node.app.testbed.profiles import PROFILES
    from node.config import ConfigError, load_swarm_config, parse_override

    if profile not in PROFILES:
        fail(f"--profile: unknown {profile!r}; known: {', '.join(PROFILES)}")
    sizes = int_list(nodes, "--nodes", 2, 4096)
    try:
        cfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
    except ConfigError as e:
        fail(str(e))
    if cfg.node.task is not None:
        fail("bench predict takes the built-in image tasks (its target is an accuracy): remove task from the config")
    from node.protocol.data import DatasetMissing
    from node.task import TaskError

    rows = []
    try:
        step = step_seconds or bench.measured_step_seconds(cfg)
        typer.echo(f"bench predict: sizes {sizes} on {profile}, {step * 1000:.1f} ms per local step", err=True)
        for n in sizes:
            rows.append(bench.predict(cfg, n, profile, step, idle_seconds, target))
            p = rows[-1]
            typer.echo(
                f"  {n} nodes: simulated in {p.simulated_in_s:.0f} s; wall {p.wall_median_s:.1f} s (slowest "
                f"{p.wall_max_s:.1f}), utilization {p.utilization:.1%}, to target {p.to_target_s} s",
                err=True,
            )
    except (ConfigError, TaskError, DatasetMissing, ValueError) as e:  # e.g. too few samples for that many nodes
        fail(str(e).splitlines()[0])
    text = bench.table(rows, profile, step, target)
    typer.echo(text)
    meta = {"profile": profile, "step_seconds": step, "idle_seconds": idle_seconds, "target": target}
    report(out, meta, lambda out, meta: bench.write_outputs(rows, out, meta, text))

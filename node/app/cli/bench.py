"""`atoll bench ...`: benchmarks against baselines measured in the same invocation."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from node.app.cli.common import SET_HELP, fail, int_list, names_or_fail

bench_app = typer.Typer(
    help="Benchmarks that compare atoll against baselines measured in the same run.", no_args_is_help=True
)


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

    size_list = int_list(sizes, "--sizes", 1, 4096)
    paths = tuple(p for p in transport.PATHS if not (skip_hivemind and p == "hivemind"))
    if only:
        wanted = [p.strip() for p in only.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in transport.PATHS]
        if unknown:
            fail(f"--paths: unknown {', '.join(unknown)}; known: {', '.join(transport.PATHS)}")
        paths = tuple(p for p in paths if p in wanted)

    def progress(row):
        typer.echo(f"  {row.size_mb:>5} MiB  {row.path:<12} {row.gbps:7.3f} GB/s", err=True)

    typer.echo(f"bench transport: sizes {size_list} MiB, best of {repeats}, paths {', '.join(paths)}", err=True)
    rows = transport.run(size_list, repeats=repeats, paths=paths, progress=progress)
    if as_json:
        typer.echo(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        typer.echo(transport.table(rows))
    report(
        out, {"sizes_mib": size_list, "repeats": repeats}, lambda out, meta: transport.write_outputs(rows, out, meta)
    )


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
    from node.app.bench import algorithms as alg

    seed_list = int_list(seeds, "--seeds", 0, 2**31)
    names = names_or_fail(methods, "--methods", alg.methods(rounds))
    base = _bench_node(dataset, alpha, rounds, local_steps)
    rows = simulate(len(names) * len(seed_list), lambda progress: alg.run(nodes, base, names, seed_list, progress))
    typer.echo(alg.table(alg.summarize(rows)))
    report(
        out,
        {"title": f"{nodes} nodes, {dataset}, alpha {alpha}"},
        lambda out, meta: alg.write_outputs(rows, out, meta),
    )


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
    from node.app.bench import compression as comp

    seed_list = int_list(seeds, "--seeds", 0, 2**31)
    work = names_or_fail(workloads, "--workloads", comp.WORKLOADS)
    names = names_or_fail(methods, "--methods", comp.methods())
    rows = simulate(
        len(work) * len(names) * len(seed_list),
        lambda progress: comp.run(work, names, seed_list, consensus_step=consensus_step, progress=progress),
    )
    summary = comp.summarize(rows)
    typer.echo(comp.table(summary))
    typer.echo("\n".join(comp.targets(summary)))
    report(
        out, {"title": "compressed gossip, 4 nodes on a ring"}, lambda out, meta: comp.write_outputs(rows, out, meta)
    )


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
    from node.app.bench import distill
    from node.protocol.models import FAMILIES

    archs = [a.strip() for a in architectures.split(",") if a.strip()]
    for a in archs:
        family, _, width = a.partition(":")
        if family not in FAMILIES or not width.isdigit() or not 4 <= int(width) <= 8192:
            fail(f"--architectures: {a!r} is not family:width with family in {', '.join(FAMILIES)} and width 4..8192")
    _topology_or_fail(topology)
    seed_list = int_list(seeds, "--seeds", 0, 2**31)
    table = distill.methods(rounds, archs)
    names = names_or_fail(methods, "--methods", table)
    base = _bench_node(
        dataset,
        alpha,
        rounds,
        local_steps,
        comm={"topology": topology},
        distill={"steps": distill_steps, "proxy_size": proxy_size},
    )
    base["data"] = {**base["data"], "personal_holdout": 0.2}
    rows = simulate(
        len(names) * len(seed_list), lambda progress: distill.run(nodes, base, archs, names, seed_list, progress)
    )
    typer.echo(distill.table(distill.summarize(rows), archs))
    report(
        out,
        {"title": f"{nodes} nodes ({', '.join(archs)}), {dataset}, alpha {alpha}, {topology}"},
        lambda out, meta: distill.write_outputs(rows, out, meta, archs),
    )


def _bench_node(dataset: str, alpha: float, rounds: int, local_steps: int, **sections) -> dict:
    """Nested NodeConfig overrides shared by every method of a simulated benchmark."""
    tree = {"data": {"dataset": dataset, "alpha": alpha}, "train": {"rounds": rounds, "local_steps": local_steps}}
    return {**tree, **sections}


def simulate(total: int, run: Callable[[Callable], list]) -> list:
    """`run(progress)` under a progress bar of `total` steps (each `progress(row)` call is one), with a config or
    data problem as one line (e.g. a proxy set larger than the data). The virtual nodes' own warnings (flagged
    peers) are left to the tables."""
    from rich.progress import Progress

    from node.config import ConfigError
    from node.protocol.data import DatasetMissing

    logging.getLogger("atoll").setLevel(logging.ERROR)
    with Progress(transient=True) as bar:
        task = bar.add_task("simulating", total=total)
        try:
            return run(lambda row: bar.advance(task))
        except (ConfigError, DatasetMissing, ValueError) as e:
            fail(str(e).splitlines()[0])


def report(out: Path | None, meta: dict, write: Callable[[Path, dict], list[Path]]) -> None:
    """Write a benchmark's outputs into `out` when given: `write(out, meta)`, the command line added to `meta`."""
    if out is not None:
        for path in write(out, {"command": " ".join(["atoll", *sys.argv[1:]]), **meta}):
            typer.echo(f"wrote {path}", err=True)


def _topology_or_fail(name: str) -> None:
    from node.algo.comm.topology import KINDS

    if name not in KINDS:
        fail(f"--topology: unknown {name!r}; available: {', '.join(KINDS)}")


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
    algorithm: str = typer.Option("gossip", help="gossip, diloco or diloco_allreduce (pseudo-gradients forged)."),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and accuracy.png here."),
) -> None:
    """Every attack (label flip, sign flip, Gaussian, ALIE, IPM, free riding, sybils, reverse)
    against every aggregator (mean, median, trimmed mean, Krum, ClippedGossip, SybilWall,
    Bristle) and FRL's rank voting (frl), plus a sybil run, with the trust score's detection
    precision and recall, in the simulator."""
    from node.algo.security.attacks import ATTACKS
    from node.app.bench import byzantine

    atk = names_or_fail(attacks, "--attacks", ATTACKS)
    agg = names_or_fail(aggregators, "--aggregators", byzantine.DEFENCES)
    _topology_or_fail(topology)
    try:
        chosen = byzantine.algorithm_comm(algorithm, agg)
    except ValueError as e:
        fail(str(e))
    seed_list = int_list(seeds, "--seeds", 0, 2**31)
    n_byz = byzantine.byzantine_count(honest, fraction)
    base = _bench_node(dataset, alpha, rounds, local_steps, comm={"topology": topology, **chosen})
    runs = len(list(byzantine.cases(honest, n_byz, sybils, sybil_honest, atk, agg))) * len(seed_list)
    typer.echo(
        f"bench byzantine: {honest} honest + {n_byz} byzantine; sybil run {sybils} vs {sybil_honest}; "
        f"{runs} simulations",
        err=True,
    )
    rows = simulate(
        runs, lambda progress: byzantine.run(base, seed_list, honest, n_byz, sybils, sybil_honest, atk, agg, progress)
    )
    typer.echo(byzantine.tables(byzantine.summarize(rows), agg))
    report(
        out,
        {
            "title": f"{honest} honest + {n_byz} byzantine, {dataset}, alpha {alpha}, {topology}, {rounds} rounds, "
            f"{algorithm}"
        },
        lambda out, meta: byzantine.write_outputs(rows, out, meta),
    )


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
        fail(f"--systems takes atoll and any of {', '.join(bench.SYSTEMS[1:])}; got {systems!r}")
    try:
        scfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
    except ConfigError as e:
        fail(str(e))
    typer.echo(f"bench swarm: {scfg.nodes} nodes, {', '.join(chosen)}, {repeats} alternated repeats", err=True)
    try:
        runs = bench.run(scfg, repeats, target, chosen, flower_venv, progress=lambda m: typer.echo(m, err=True))
    except (bench.BenchError, RuntimeError, TimeoutError) as e:
        fail(str(e))
    typer.echo(bench.table(runs, target))
    report(out, {"target": target, "repeats": repeats}, lambda out, meta: bench.write_outputs(runs, out, meta, target))


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

    seed_list = int_list(seeds, "--seeds", 0, 2**31 - 1)
    try:
        scfg = load_swarm_config(config, dict(parse_override(s) for s in set_))
        typer.echo(f"bench task: {scfg.nodes} nodes, {scfg.node.task or 'built-in'}, seeds {seed_list}", err=True)
        rows = bench.run(scfg, seed_list, progress=lambda m: typer.echo(m, err=True))
    except (ConfigError, TaskError, ArithmeticError, RuntimeError, ValueError, NonFinite) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    typer.echo(bench.table(rows))
    report(out, {"title": f"{rows[0].metric}: {config.name}"}, lambda out, meta: bench.write_outputs(rows, out, meta))


@bench_app.command("scale")
def bench_scale(
    sizes: str = typer.Option("16,64,256", help="Numbers of virtual nodes, comma-separated."),
    rounds: int = typer.Option(20, min=1, max=10000),
    local_steps: int = typer.Option(10, min=1),
    out: Path | None = typer.Option(None, help="Write results.json, table.md and scale.png here."),
) -> None:
    """Simulator seconds per round and peak memory against the number of virtual nodes."""
    from node.app.bench import scale

    size_list = int_list(sizes, "--sizes", 2, 4096)
    try:
        rows = scale.run(
            size_list,
            rounds,
            local_steps,
            progress=lambda r: typer.echo(f"  {r['nodes']} nodes: {r['seconds_per_round']:.2f} s/round", err=True),
        )
    except RuntimeError as e:
        fail(str(e))
    typer.echo(scale.table(rows))
    report(out, {}, lambda out, meta: scale.write_outputs(rows, out, meta))

"""`atoll bench experts`: decentralized diffusion experts against a monolith at equal training compute."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.bench import bench_app, report
from node.app.cli.common import fail, int_list


@bench_app.command("experts")
def bench_experts(
    clusters: int = typer.Option(4, min=2, max=16, help="K: clusters, one expert each."),
    steps: int = typer.Option(1500, min=1, help="Training steps per expert (the monolith gets K times as many)."),
    router_steps: int = typer.Option(2000, min=1, help="Router training steps."),
    width: int = typer.Option(256, min=8, max=4096, help="Hidden width (mlp) or full-resolution channels (unet)."),
    net: str = typer.Option("mlp", help="mlp (flattened pixels) or unet (a small conv U-Net, 28x28 images)."),
    batch_size: int = typer.Option(128, min=1, max=4096, help="Images per training step, every net."),
    cluster_on: str = typer.Option(
        "pixels", help="KMeans on pixels, or on features (the judge classifier's penultimate layer)."
    ),
    judge_steps: int = typer.Option(1500, min=1, help="Training steps of the judge classifier."),
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

    seed_list = int_list(seeds, "--seeds", 0, 2**31)
    if dataset not in ("digits", "fashion-mnist"):
        fail(f"--dataset: unknown {dataset!r}")
    from node.algo.experts.cluster import SPACES
    from node.algo.experts.nets import NETS

    if net not in NETS:
        fail(f"--net must be one of {', '.join(NETS)}, got {net!r}")
    if cluster_on not in SPACES:
        fail(f"--cluster-on must be one of {', '.join(SPACES)}, got {cluster_on!r}")
    if net == "unet" and (width % 8 or dataset == "digits"):
        fail("--net unet needs --width a multiple of 8 and 28x28 images (--dataset fashion-mnist)")
    spec = dict(
        k=clusters,
        steps=steps,
        router_steps=router_steps,
        width=width,
        net=net,
        batch_size=batch_size,
        cluster_on=cluster_on,
        judge_steps=judge_steps,
        n=samples,
        sample_steps=sample_steps,
    )
    note = lambda s: typer.echo(s, err=True)  # noqa: E731
    from node.protocol.data.datasets import DatasetMissing

    try:
        rows, infos, judge_acc = bench.run(dataset, spec, seed_list, out, note)
    except (DatasetMissing, OSError) as e:
        fail(str(e))
    typer.echo(bench.tables(bench.summarize(rows), infos))
    report(
        out,
        {
            "title": f"{clusters} experts vs monolith, {dataset}, {net} width {width}, {steps} steps per expert, "
            f"{len(seed_list)} seeds",
            **spec,
        },
        lambda out, meta: bench.write_outputs(rows, infos, judge_acc, out, meta),
    )

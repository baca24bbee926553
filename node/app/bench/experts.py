"""`atoll bench experts`: the Decentralized Diffusion Models table in miniature.

K experts, each trained in isolation on one KMeans cluster for S steps, against one monolith
of the same architecture trained on all data for K * S steps (equal total training compute;
the router's training is reported on top). Samples from the monolith and from the ensemble
with top-1, top-2 and full routing are scored with a classifier trained in the same run
(node/app/evaluate.py). Then router throughput: the same experts called in process, and
through their gRPC Predict on 127.0.0.1, in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from node.algo.experts import ensemble, flow
from node.algo.experts.cluster import cluster, from_unit, to_unit
from node.algo.experts.nets import denoiser_net, router_net
from node.algo.experts.router import router_accuracy, train_router
from node.app import evaluate
from node.app.bench import write_results
from node.app.grid import save_grid
from node.app.plotting import pyplot
from node.net.experts import service
from node.protocol.data import load_dataset
from p2pd.rpc import router_pb2_grpc as pb_grpc
from p2pd.server import SnapshotStore, SwarmServer

METHODS = ("monolith", "top1", "top2", "full")


def _run_seed(
    ds, spec: dict, seed: int, judge, out: Path | None, note: Callable[[str], None]
) -> tuple[list[dict], dict]:
    k, steps, width, net, bs = spec["k"], spec["steps"], spec["width"], spec["net"], spec["batch_size"]
    n, sample_steps = spec["n"], spec["sample_steps"]
    features = judge.features(ds.x_train) if spec["cluster_on"] == "features" else None
    cl = cluster(ds.x_train, k, seed, features)
    x = to_unit(ds.x_train)
    dim, shape = x.shape[1], tuple(ds.x_train.shape[1:])
    t0 = time.perf_counter()
    experts = {}
    for j in range(k):
        experts[j] = denoiser_net(net, shape, width, seed=seed * 1000 + j)
        flow.train_denoiser(experts[j], x[cl.labels == j], steps, batch_size=bs, seed=seed * 1000 + j)
        note(f"seed {seed}: expert {j} trained ({int((cl.labels == j).sum())} images)")
    expert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mono = denoiser_net(net, shape, width, seed=seed * 1000 + 999)
    flow.train_denoiser(mono, x, k * steps, batch_size=bs, seed=seed * 1000 + 999)
    mono_s = time.perf_counter() - t0
    note(f"seed {seed}: monolith trained ({mono_s:.0f} s; experts {expert_s:.0f} s)")
    rt = router_net(net, shape, k, width, seed=seed)
    train_router(rt, x, cl.labels, spec["router_steps"], batch_size=bs, seed=seed)
    probe = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:2000]  # router accuracy on these
    info = dict(
        seed=seed,
        cluster_sizes=torch.bincount(cl.labels, minlength=k).tolist(),
        expert_train_s=expert_s,
        mono_train_s=mono_s,
        router_acc={str(t): router_accuracy(rt, x[probe], cl.labels[probe], t) for t in (0.1, 0.5, 0.9)},
        class_mix=_class_mix(ds.y_train, cl.labels, k, ds.num_classes),
    )
    rows = []
    for method in METHODS:
        gen = torch.Generator().manual_seed(10_000 + seed)
        t0 = time.perf_counter()
        if method == "monolith":
            v, calls = flow.euler_sample(mono, n, dim, sample_steps, gen), sample_steps
        else:
            res = ensemble.sample(rt, experts, k, n, dim, sample_steps, ensemble.parse_strategy(method, k), gen)
            v, calls = res.x, res.expert_calls
        seconds = time.perf_counter() - t0
        images = from_unit(v, shape)
        rows.append(
            dict(
                method=method,
                seed=seed,
                **evaluate.score(judge, images, ds.x_test, ds.num_classes),
                expert_calls=calls,
                sample_seconds=seconds,
            )
        )
        if out is not None and seed == spec["grid_seed"]:
            save_grid(images[:64], out / f"grid_{method}.png", cols=8, title=f"{method} (seed {seed})")
    info["throughput"] = throughput(rt, experts, k, dim, sample_steps)
    return rows, info


def _class_mix(y: torch.Tensor, labels: torch.Tensor, k: int, classes: int) -> list[list[int]]:
    """(K, classes) counts: how many images of each class every cluster holds."""
    return torch.bincount(labels * classes + y, minlength=k * classes).reshape(k, classes).tolist()


def throughput(rt, experts: dict, k: int, dim: int, sample_steps: int, n: int = 64, repeats: int = 3) -> dict:
    """Samples per second of top-1 and full routing with the experts in process, and with the
    same experts behind gRPC Predict servers on 127.0.0.1 (best of `repeats`)."""
    servers, remotes = [], {}
    try:
        for j, model in experts.items():
            srv = SwarmServer(SnapshotStore(), max_request_bytes=service.MAX_MESSAGE_BYTES)
            srv.add_service(
                pb_grpc.add_ExpertServicer_to_server,
                service.ExpertService(model, j, "bench", dim, torch.device("cpu")),
            )
            port = srv.start()
            servers.append(srv)
            remotes[j] = service.RemoteExpert(f"127.0.0.1:{port}", j, "bench", dim)
        result = {}
        for strategy in ("top1", "full"):
            top = ensemble.parse_strategy(strategy, k)
            for where, ex in (("local", experts), ("remote", remotes)):
                best = min(
                    _timed(
                        lambda: ensemble.sample(rt, ex, k, n, dim, sample_steps, top, torch.Generator().manual_seed(r))
                    )
                    for r in range(repeats)
                )
                result[f"{strategy}_{where}"] = n / best
            result[f"{strategy}_ratio"] = result[f"{strategy}_remote"] / result[f"{strategy}_local"]
        return result
    finally:
        for r in remotes.values():
            r.close()
        for s in servers:
            s.stop(0)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(
    dataset: str,
    spec: dict,
    seeds: list[int],
    out: Path | None,
    note: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict], list[dict], float]:
    """Every method over every seed: one row per (method, seed) with the judge's scores."""
    ds = load_dataset(dataset)
    judge = evaluate.train_judge(ds, spec.get("judge_steps", 1500))
    note(f"judge classifier: {100 * judge.accuracy:.1f}% test accuracy")
    rows, infos = [], []
    for seed in seeds:
        r, info = _run_seed(ds, dict(spec, grid_seed=seeds[0]), seed, judge, out, note)
        rows += r
        infos.append(info)
    # what real data scores (the floor of the Fréchet distance at this sample size)
    real = ds.x_train[torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(0))[: spec["n"]]]
    rows.append(
        dict(
            method="real (train images)",
            seed=-1,
            **evaluate.score(judge, real, ds.x_test, ds.num_classes),
            expert_calls=0,
            sample_seconds=0.0,
        )
    )
    return rows, infos, judge.accuracy


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: scores averaged over seeds."""
    out = []
    for method in [*METHODS, "real (train images)"]:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        fd = [r["frechet"] for r in rs]
        out.append(
            dict(
                method=method,
                frechet=statistics.fmean(fd),
                frechet_sd=statistics.pstdev(fd),
                confidence=statistics.fmean(r["confidence"] for r in rs),
                coverage=statistics.fmean(r["coverage"] for r in rs),
                per_seed=fd,
                expert_calls=statistics.fmean(r["expert_calls"] for r in rs),
            )
        )
    return out


def tables(summary: list[dict], infos: list[dict]) -> str:
    """Markdown tables of sample quality per method and of the experts trained."""
    lines = [
        "| method | Fréchet distance (± sd over seeds) | per seed | judge confidence | class coverage "
        "| expert calls per run |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['frechet']:.1f} ± {s['frechet_sd']:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in s['per_seed'])} | {100 * s['confidence']:.1f}% | "
            f"{100 * s['coverage']:.0f}% | {s['expert_calls']:.0f} |"
        )
    lines += [
        "",
        "| routing | in process (samples/s) | gRPC on 127.0.0.1 (samples/s) | remote / local |",
        "|---|---:|---:|---:|",
    ]
    for strategy in ("top1", "full"):
        loc = statistics.fmean(i["throughput"][f"{strategy}_local"] for i in infos)
        rem = statistics.fmean(i["throughput"][f"{strategy}_remote"] for i in infos)
        lines.append(f"| {strategy} | {loc:.0f} | {rem:.0f} | {rem / loc:.2f} |")
    ra = {t: statistics.fmean(i["router_acc"][t] for i in infos) for t in ("0.1", "0.5", "0.9")}
    lines += [
        "",
        "Router accuracy (right cluster of x_t): " + ", ".join(f"t={t}: {100 * a:.0f}%" for t, a in ra.items()),
    ]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Frechet distance per method as a bar chart, written to `path` (PNG)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [s["method"] for s in summary]
    ax.bar(names, [s["frechet"] for s in summary], yerr=[s["frechet_sd"] for s in summary], color="#4477aa")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], infos: list[dict], judge_accuracy: float, out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and the plots in `out`; returns their paths."""
    summary = summarize(rows)
    md = tables(summary, infos)
    paths = write_results(
        out,
        dict(meta=meta, judge_accuracy=judge_accuracy, summary=summary, rows=rows, seeds=infos),
        f"# {meta.get('title', 'experts')}\n\n    {meta.get('command', '')}\n\n{md}",
    )
    plot(summary, out / "frechet.png")
    return [*paths, out / "frechet.png", *sorted(out.glob("grid_*.png"))]

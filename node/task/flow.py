"""Built-in task: the diffusion experts' flow-matching denoiser (node/algo/experts/flow.py) on the
task contract. A swarm can train one denoiser together (gossip, schedules, final merge), and an
expert node (node/net/experts/roles.py) trains its cluster's denoiser in isolation through the
same hooks.

    task: node.task.flow:denoiser
    task_config: {dataset: fashion-mnist, net: unet, width: 16, split: clusters, cluster_on: features}

Images are flattened to [-1, 1] vectors (node.algo.experts.cluster.to_unit). `net`: `mlp`
(`width` units, `depth` layers) or `unet` (`width` channels, 28x28 images). `split: iid` deals
the shuffled training images round-robin; `split: clusters` gives node i the images of KMeans
cluster i mod `clusters` (default: one cluster per node), the experts' non-IID case, with
`cluster_on: pixels` or `features` (the penultimate layer of a judge classifier trained for
`feature_steps` steps, node/protocol/judge.py). The loss is rectified-flow velocity regression on
fresh noise each step; `evaluate` returns `flow_loss`, the same loss on up to 512 held-out test
images with fixed noise (lower is better).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from node.algo.experts import flow
from node.algo.experts.cluster import SPACES, Clustering, cluster, to_unit
from node.algo.experts.nets import NETS, denoiser_net
from node.task import Task
from node.task.images import dataset

KEYS = {"dataset", "net", "width", "depth", "split", "clusters", "cluster_on", "feature_steps", "cache_dir"}


def clustering(
    name: str, k: int, seed: int, cluster_on: str = "pixels", feature_steps: int = 1000, cache_dir: Path | None = None
) -> Clustering:
    """The K clusters of data set `name`'s training images, from `seed`: KMeans on pixels, or on the standardised
    penultimate features of a judge classifier trained for `feature_steps` steps. With `cache_dir`, kept in (and
    read back from) `cache_dir/clustering-<key>.safetensors`, a file other machines can copy to share one clustering
    (its digest is what expert records carry). Raises ValueError for an unknown `cluster_on`, k out of range or a
    cache file that does not fit the data set, DatasetMissing for data that is not installed."""
    from safetensors.torch import save_file

    if cluster_on not in SPACES:
        raise ValueError(f"cluster_on must be one of {', '.join(SPACES)}, got {cluster_on!r}")
    ds = dataset(name, 0.25, 0, None)
    spec = dict(dataset=name, k=k, seed=seed, cluster_on=cluster_on, feature_steps=feature_steps)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"clustering-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a file; remove it to derive the clustering again")
    if path is not None and path.is_file():
        return _read_clustering(path, name, k, len(ds.x_train))
    features = None
    if cluster_on == "features":
        from node.protocol.judge import train_judge

        with torch.random.fork_rng(devices=[]):
            features = train_judge(ds, feature_steps, seed).features(ds.x_train)
    cl = cluster(ds.x_train, k, seed, features)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        save_file(
            {"centroids": cl.centroids.contiguous(), "labels": cl.labels.contiguous()}, tmp, metadata=spec_str(spec)
        )
        tmp.replace(path)  # atomic: a daemon that starts beside this one reads a whole file or none
    return cl


def _read_clustering(path: Path, name: str, k: int, n: int) -> Clustering:
    """The clustering in `path`, checked against the data set (`n` images, `k` clusters). Raises ValueError naming
    what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "delete it to derive the clustering again"
    try:
        saved = load_file(path)
        centroids, labels = saved["centroids"], saved["labels"]
    except (SafetensorError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a clustering file ({e}); {fix}") from None
    if centroids.dtype != torch.float32 or labels.dtype != torch.int64:
        raise ValueError(f"{path}: centroids must be float32 and labels int64; {fix}")
    if centroids.dim() != 2 or len(centroids) != k or not torch.isfinite(centroids).all():
        raise ValueError(f"{path}: needs {k} finite centroids (one row each); {fix}")
    if labels.shape != (n,) or not ((labels >= 0) & (labels < k)).all():
        raise ValueError(f"{path}: needs one label in [0, {k}) for each of the {n} images of {name}; {fix}")
    if (torch.bincount(labels, minlength=k) == 0).any():
        raise ValueError(f"{path}: a cluster without images; {fix}")
    return Clustering(centroids, labels)


def spec_str(spec: dict) -> dict[str, str]:
    """safetensors metadata: every value as a string."""
    return {k: str(v) for k, v in spec.items()}


def denoiser(config: dict) -> Task:
    """The denoiser task from `task_config` (see the module docstring). Raises ValueError for
    unknown keys or values, DatasetMissing for data that is not installed."""
    unknown = set(config) - KEYS
    if unknown:
        raise ValueError(f"unknown task_config keys {sorted(unknown)}; known: {', '.join(sorted(KEYS))}")
    name, split = str(config.get("dataset", "digits")), str(config.get("split", "iid"))
    net = str(config.get("net", "mlp"))
    width, depth = int(config.get("width", 256 if net == "mlp" else 16)), int(config.get("depth", 3))
    if split not in ("iid", "clusters"):
        raise ValueError(f"split must be iid or clusters, got {split!r}")
    if net not in NETS:
        raise ValueError(f"net must be one of {', '.join(NETS)}, got {net!r}")
    ds = dataset(name, 0.25, 0, None)
    x_train, x_test = to_unit(ds.x_train), to_unit(ds.x_test)[:512]
    shape = tuple(ds.x_train.shape[1:])
    denoiser_net(net, shape, width, depth)  # a shape or width the net cannot take fails here, as a config error
    noise = torch.Generator().manual_seed(0)  # fresh noise every step, reproducible per process
    fixed = flow.noisy(x_test, torch.Generator().manual_seed(1))  # the held-out triples
    cache = config.get("cache_dir")

    def train_data(index: int, count: int, seed: int) -> TensorDataset:
        if split == "iid":
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
            return TensorDataset(x_train[order[index::count]])
        k = int(config.get("clusters", count))
        cl = clustering(
            name,
            k,
            seed,
            str(config.get("cluster_on", "pixels")),
            int(config.get("feature_steps", 1000)),
            Path(cache).expanduser() if cache else None,
        )
        return TensorDataset(x_train[cl.labels == index % k])

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        x1 = batch[0]
        xt, t, target = flow.noisy(x1, noise)
        return (model(xt, t) - target).pow(2).mean()

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        dev = next(model.parameters()).device
        xt, t, target = (v.to(dev) for v in fixed)
        return {"flow_loss": float((model(xt, t) - target).pow(2).mean())}

    return Task(
        name=f"{name}/denoiser-{net}",
        model=lambda seed: denoiser_net(net, shape, width, depth, seed),
        train_data=train_data,
        loss=loss,
        evaluate=evaluate,
        metric="flow_loss",
        higher_is_better=False,
    )

"""Built-in task: the diffusion experts' flow-matching denoiser (node/algo/experts/flow.py) on the
task contract, so a swarm can train one denoiser together (gossip, schedules, final merge)
where the experts train one per cluster in isolation.

    task: node.task.flow:denoiser
    task_config: {dataset: digits, width: 256, depth: 3, split: iid}

Images are flattened to [-1, 1] vectors (node.algo.experts.cluster.to_unit). `split: iid` deals the
shuffled training images round-robin; `split: clusters` gives node i the images of pixel-KMeans
cluster i mod `clusters` (default: one cluster per node), the experts' non-IID case. The loss
is rectified-flow velocity regression on fresh noise each step; `evaluate` returns
`flow_loss`, the same loss on up to 512 held-out test images with fixed noise (lower is better).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from node.algo.experts import flow
from node.algo.experts.cluster import cluster, to_unit
from node.task import Task
from node.task.images import dataset

KEYS = {"dataset", "width", "depth", "split", "clusters"}


def denoiser(config: dict) -> Task:
    """The denoiser task from `task_config` (see the module docstring). Raises ValueError for
    unknown keys or values, DatasetMissing for data that is not installed."""
    unknown = set(config) - KEYS
    if unknown:
        raise ValueError(f"unknown task_config keys {sorted(unknown)}; known: {', '.join(sorted(KEYS))}")
    name, split = str(config.get("dataset", "digits")), str(config.get("split", "iid"))
    width, depth = int(config.get("width", 256)), int(config.get("depth", 3))
    if split not in ("iid", "clusters"):
        raise ValueError(f"split must be iid or clusters, got {split!r}")
    ds = dataset(name, 0.25, 0, None)
    x_train, x_test = to_unit(ds.x_train), to_unit(ds.x_test)[:512]
    dim = x_train.shape[1]
    noise = torch.Generator().manual_seed(0)  # fresh noise every step, reproducible per process
    fixed = flow.noisy(x_test, torch.Generator().manual_seed(1))  # the held-out triples

    def train_data(index: int, count: int, seed: int) -> TensorDataset:
        if split == "iid":
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
            return TensorDataset(x_train[order[index::count]])
        k = int(config.get("clusters", count))
        labels = cluster(ds.x_train, k, seed).labels
        return TensorDataset(x_train[labels == index % k])

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        xt, t, target = flow.noisy(batch[0], noise)
        return (model(xt, t) - target).pow(2).mean()

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        dev = next(model.parameters()).device
        xt, t, target = (v.to(dev) for v in fixed)
        return {"flow_loss": float((model(xt, t) - target).pow(2).mean())}

    return Task(
        name=f"{name}/denoiser",
        model=lambda seed: flow.denoiser(dim, width, depth, seed),
        train_data=train_data,
        loss=loss,
        evaluate=evaluate,
        metric="flow_loss",
        higher_is_better=False,
    )

"""The built-in task: image classification on a data set that ships offline (digits,
Fashion-MNIST) with an MLP or a CNN, from the `data` and `model` sections of the node config.

Node `index` of `count` trains on its share of the training split (IID, Dirichlet or shards,
`node.protocol.data.partition`); for logit exchange the proxy set leaves the pool first, so it is
nobody's labelled data. Metric: top-1 accuracy on the shared test split; with
`data.personal_holdout` also `own_accuracy`, on rows of the node's own share held out from
its training (its own distribution, what personalized methods such as FedD2S aim at).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from node.algo import distill
from node.config import ConfigError
from node.protocol.data import Dataset, load_dataset, partition
from node.protocol.models import build_model
from node.protocol.train import evaluate
from node.task import Labelled, Task, TensorDataset


@lru_cache(maxsize=4)
def dataset(name: str, test_fraction: float, seed: int, path: Path | None) -> Dataset:
    """Loaded once per process: the virtual nodes of a simulation share one copy."""
    return load_dataset(name, test_fraction=test_fraction, seed=seed, path=path)


def classification_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of `model` on a batch (x float (B, ...), y int64 (B,))."""
    return F.cross_entropy(model(batch[0]), batch[1])


def image_task(cfg) -> Task:
    """The task of a NodeConfig without `task:`. Raises ConfigError for a proxy set that does not
    fit the data, DatasetMissing for data that is not installed."""
    d, m = cfg.data, cfg.model
    ds = dataset(d.dataset, d.test_fraction, d.seed, d.path)
    pool, proxy_x, proxy_digest = np.arange(len(ds.y_train)), None, ""
    if cfg.comm.exchange == "logits":
        try:
            proxy_idx, proxy_digest = distill.proxy_split(len(pool), cfg.distill.proxy_size, d.seed, d.dataset)
        except ValueError as e:
            raise ConfigError(f"invalid config: distill.proxy_size: {e}") from None
        pool = np.setdiff1d(pool, proxy_idx)
        proxy_x = ds.x_train[torch.from_numpy(proxy_idx)]

    def train_data(index: int, count: int, seed: int) -> TensorDataset:
        # many nodes on a small data set: each still needs a few samples
        min_size = max(1, min(10, len(pool) // (2 * count)))
        parts = partition(
            ds.y_train.numpy()[pool],
            count,
            d.partition,
            alpha=d.alpha,
            shards_per_node=d.shards_per_node,
            seed=seed,
            min_size=min_size,
        )
        mine = torch.from_numpy(pool[parts[index]])
        if d.personal_holdout > 0:  # the node's own distribution, held out (FedD2S's figure)
            order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed * 7 + index))
            cut = max(1, int(round(d.personal_holdout * len(mine))))
            held, mine = mine[order[:cut]], mine[order[cut:]]
            own_test["x"], own_test["y"] = ds.x_train[held], ds.y_train[held]
        return TensorDataset(ds.x_train[mine], ds.y_train[mine])

    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    own_test: dict[str, torch.Tensor] = {}  # this task's node's held-out rows (data.personal_holdout)

    def accuracy(model: torch.nn.Module) -> dict[str, float]:
        dev = next(model.parameters()).device
        if dev not in on_device:
            on_device[dev] = (ds.x_test.to(dev), ds.y_test.to(dev))
        out = {"accuracy": evaluate(model, *on_device[dev])}
        if own_test:
            if own_test["x"].device != dev:
                own_test["x"], own_test["y"] = own_test["x"].to(dev), own_test["y"].to(dev)
            out["own_accuracy"] = evaluate(model, own_test["x"], own_test["y"])
        return out

    return Task(
        name=f"{d.dataset}/{m.family}",
        model=lambda seed: build_model(m.family, ds.input_shape, ds.num_classes, m.width, seed),
        train_data=train_data,
        loss=classification_loss,
        evaluate=accuracy,
        metric="accuracy",
        labelled=Labelled(ds.x_test, ds.y_test, ds.num_classes, proxy_x, proxy_digest),
    )

"""A task of your own, written by `atoll new task NAME` from atoll's node/task/template.py.

Edit the four hooks below for your model and data, keep the names. atoll calls them on every
node: `model(seed)` (the same seed on every node, so the swarm shares one init),
`train_data(index, count, seed)` (node `index` of `count`'s samples), `loss(model, batch)`
and `evaluate(model)` (held-out metrics; `metric` names the one reported). `config` is the
`task_config:` section of the YAML. Run it: `atoll swarm up -c NAME.yaml`.

As written: linear regression on synthetic data, where each node holds too few samples to fit
the weights alone and the swarm together holds enough.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from node.task import Task


def task(config: dict) -> Task:
    """The task, built from `task_config` (dim: input features, per_node: samples per node)."""
    unknown = set(config) - {"dim", "per_node"}  # a misspelt key must not pass silently
    if unknown:
        raise ValueError(f"unknown task_config keys {sorted(unknown)}; known: dim, per_node")
    dim, per_node, noise = int(config.get("dim", 20)), int(config.get("per_node", 16)), 0.1
    truth = torch.randn(dim, 1, generator=torch.Generator().manual_seed(0))

    def sample(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, dim, generator=g)
        return x, x @ truth + noise * torch.randn(n, 1, generator=g)

    x_test, y_test = sample(500, 12345)  # held out, the same on every node

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Linear(dim, 1)

    def train_data(index: int, count: int, seed: int) -> TensorDataset:
        return TensorDataset(*sample(per_node, 1000 * seed + index + 1))

    def loss(m: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"mse": float(F.mse_loss(m(x_test), y_test))}

    return Task(
        name="linear-regression",
        model=model,
        train_data=train_data,
        loss=loss,
        evaluate=evaluate,
        metric="mse",
        higher_is_better=False,
    )

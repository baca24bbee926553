"""The task contract: what a workload gives atoll, and the checks atoll runs on it.

A task is the user's model, data, loss and metrics. atoll owns everything else: partitions
joined to peers, the optimizer's step-size schedule, gossip, robust aggregation, checkpoints.

    from node.task import Task

    def task(config: dict) -> Task:          # `task: ./my_task.py:task` in the node YAML,
        return Task(                         # `task_config:` is passed as `config`
            name="regression",
            model=lambda seed: make_model(seed),                   # same seed, same init
            train_data=lambda index, count, seed: my_dataset(index, count, seed),
            loss=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
            evaluate=lambda model: {"mse": held_out_mse(model)},
            metric="mse",
            higher_is_better=False,
        )

`train_data(index, count, seed)` returns node `index` of `count`'s training samples as a
map-style `torch.utils.data.Dataset` (with `__len__`) or an `IterableDataset` (a stream: data
larger than memory; its `__len__`, where it has one, weighs the node in averages). A
`TensorDataset` is indexed in place, any other map-style dataset item by item and collated with
torch's `default_collate`, drawn with a generator seeded per (seed, round) so a resumed node
replays its sample order. `train.loader_workers: N` reads batches in N DataLoader worker
processes instead (augmentation, decoding), and an IterableDataset always goes through a
DataLoader (node/train: LocalTrainer).
`node.protocol.data.partition` splits labels IID, by Dirichlet or by shards for tasks that want it.

Every hook runs through `Checked`, which turns an exception or a wrong return type in user code
into one `TaskError` line naming the task and the hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset


class TaskError(ValueError):
    """A task that cannot be used: a bad reference, a hook that raised or returned the wrong
    type. The message is one line naming the task and the hook."""


@dataclass(frozen=True)
class Labelled:
    """Extras of a classification task whose `train_data` returns TensorDataset(x, y) (float
    inputs (N, ...), int64 labels (N,)), which logit exchange (distillation on a proxy set), the
    bristle aggregator and label-flipping rehearsals need: the held-out `x_test`/`y_test`,
    `num_classes`, and for logit exchange the proxy inputs `proxy_x` with their `proxy_digest`."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    proxy_x: torch.Tensor | None = None
    proxy_digest: str = ""


@dataclass(frozen=True)
class Task:
    """A workload (see the module docstring). `model(seed)` -> nn.Module; `train_data(index,
    count, seed)` -> Dataset; `loss(model, batch)` -> scalar tensor; `evaluate(model)` ->
    {metric name: float} on held-out data, with `metric` the one reported and
    `higher_is_better` its direction. Optional: `optimizer(params)` -> torch optimizer (default:
    `optim.name` of the config), `exchanged(name)` -> whether a parameter travels (default: all),
    `labelled` (classification extras, see Labelled)."""

    name: str
    model: Callable[[int], nn.Module]
    train_data: Callable[[int, int, int], Dataset]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], Mapping[str, float]]
    metric: str = "accuracy"
    higher_is_better: bool = True
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    exchanged: Callable[[str], bool] | None = None
    labelled: Labelled | None = None


class Checked:
    """`task`'s hooks with their results checked; every failure is a TaskError naming `ref`
    (how the user referred to the task) and the hook."""

    def __init__(self, task: Task, ref: str):
        """`task`: the Task to check; `ref`: how the user named it (e.g. node.task.text:kjv, or built-in), quoted in
        every TaskError. Raises TaskError when `task` is not a Task, a hook is not callable (`optimizer`, `exchanged`:
        nor None), `labelled` is not a Labelled, or `metric` is not a non-empty str."""
        if not isinstance(task, Task):
            raise TaskError(f"task {ref}: expected a node.task.Task, got {type(task).__name__}")
        for hook in ("model", "train_data", "loss", "evaluate"):
            if not callable(getattr(task, hook)):
                raise TaskError(f"task {ref}: `{hook}` must be callable")
        for hook in ("optimizer", "exchanged"):
            if getattr(task, hook) is not None and not callable(getattr(task, hook)):
                raise TaskError(f"task {ref}: `{hook}` must be callable or None")
        if task.labelled is not None and not isinstance(task.labelled, Labelled):
            raise TaskError(f"task {ref}: `labelled` must be a node.task.Labelled")
        if not isinstance(task.metric, str) or not task.metric:
            raise TaskError(f"task {ref}: `metric` must name one of the metrics `evaluate` returns")
        self.task, self.ref = task, ref

    def _fail(self, hook: str, what: str) -> TaskError:
        return TaskError(f"task {self.ref}: hook `{hook}` {what}")

    def _call(self, hook: str, *args):
        try:
            return getattr(self.task, hook)(*args)
        except TaskError:
            raise
        except Exception as e:  # user code: any exception becomes one line
            detail = str(e).splitlines()[0] if str(e) else ""
            raise self._fail(hook, f"raised {type(e).__name__}{': ' + detail if detail else ''}") from e

    def model(self, seed: int) -> nn.Module:
        """The task's model for `seed`; raises TaskError unless it is an nn.Module with parameters."""
        m = self._call("model", seed)
        if not isinstance(m, nn.Module):
            raise self._fail("model", f"returned {type(m).__name__}, expected a torch.nn.Module")
        if not any(True for _ in m.parameters()):
            raise self._fail("model", "returned a module without parameters")
        return m

    def train_data(self, index: int, count: int, seed: int) -> Dataset:
        """Node `index` of `count`'s training samples; raises TaskError unless it is a non-empty
        map-style dataset or an IterableDataset (an empty stream is found at its first batch)."""
        d = self._call("train_data", index, count, seed)
        if isinstance(d, IterableDataset):
            return d
        if not (hasattr(d, "__len__") and hasattr(d, "__getitem__")):
            raise self._fail(
                "train_data", f"returned {type(d).__name__}, expected a torch Dataset (map-style or IterableDataset)"
            )
        if len(d) == 0:
            raise self._fail("train_data", f"returned no samples for node {index} of {count}")
        return d

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The loss of `batch`; raises TaskError unless it is a scalar floating tensor."""
        value = self._call("loss", model, batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            got = (
                f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            )
            raise self._fail("loss", f"returned {got}, expected a scalar floating tensor")
        return value

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics as {name: float}; raises TaskError unless they are finite-or-NaN
        floats that include `metric`."""
        with torch.no_grad():
            out = self._call("evaluate", model)
        if not isinstance(out, Mapping):
            raise self._fail("evaluate", f"returned {type(out).__name__}, expected a dict of metric name -> float")
        try:
            metrics = {str(k): float(v) for k, v in out.items()}
        except (TypeError, ValueError):
            raise self._fail("evaluate", "returned a value that is not a number") from None
        if self.task.metric not in metrics:
            raise self._fail("evaluate", f"returned {sorted(metrics)}, without the task's metric {self.task.metric!r}")
        if any(math.isinf(v) for v in metrics.values()):
            raise self._fail("evaluate", "returned an infinite metric")
        return metrics

    def exchanged(self, name: str) -> bool:
        """Whether the tensor `name` travels (all do when the task does not say)."""
        if self.task.exchanged is None:
            return True
        return bool(self._call("exchanged", name))

    def optimizer(self, params) -> torch.optim.Optimizer | None:
        """The task's own optimizer over `params`, or None where it has none."""
        if self.task.optimizer is None:
            return None
        opt = self._call("optimizer", params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise self._fail("optimizer", f"returned {type(opt).__name__}, expected a torch.optim.Optimizer")
        return opt


def pin(batch):
    """`batch` with every CPU tensor in pinned (page-locked) memory, for non_blocking copies to CUDA."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, Mapping):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin(v) for v in batch)
    return batch


def batch_length(batch) -> int:
    """Samples in `batch`: the first dimension of its first tensor (0 when it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        n = batch_length(v)
        if n:
            return n
    return 0


def to_device(batch, device: torch.device):
    """`batch` (a tensor, or tuples, lists and dicts of them) with every tensor on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


__all__ = ["Checked", "Labelled", "Task", "TaskError", "TensorDataset", "batch_length", "pin", "to_device"]

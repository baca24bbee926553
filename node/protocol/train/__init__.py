"""Local training on the node's own partition, and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset, default_collate

from node.task import batch_length, pin, to_device


@dataclass
class RoundStats:
    """One round of local training: mean loss over its steps, steps taken, samples seen and wall seconds."""

    loss: float
    steps: int
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        """Throughput of the round in samples per second (0.0 when no time elapsed)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: RoundStats) -> RoundStats:
        """Two parts of one round as one: steps, samples and seconds summed, the loss averaged over the steps."""
        steps = self.steps + other.steps
        loss = (self.loss * self.steps + other.loss * other.steps) / steps if steps else 0.0
        return RoundStats(loss, steps, self.samples + other.samples, self.seconds + other.seconds)


def round_lr(base_lr: float, schedule: str, round_: int, rounds: int, final_fraction: float = 0.05) -> float:
    """Learning rate of a round. Cosine decays from base_lr to base_lr * final_fraction, which
    also pulls non-IID nodes together in the last rounds."""
    if schedule == "constant" or rounds <= 1:
        return base_lr
    if schedule == "cosine":
        t = min(max(round_ / (rounds - 1), 0.0), 1.0)
        return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of `optimizer` to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float):
    """An `sgd` (momentum, weight decay), `adam` (L2 weight decay) or `adamw` (decoupled weight decay, DiLoCo's
    inner optimizer: Loshchilov and Hutter, arXiv 1711.05101) optimizer over `model`'s parameters; raises
    ValueError for another name."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class LocalTrainer:
    """Minibatch training on a task's data.

    `data`: a map-style Dataset or an IterableDataset. With `workers` = 0 a map-style dataset is
    sampled with replacement from a generator seeded per (seed, round), so a resumed node
    replays the same sample order: a TensorDataset indexed in place on its tensors' device, any
    other one item by item and collated with torch's default_collate. With `workers` > 0, or for
    an IterableDataset, batches come from a persistent torch DataLoader with that many worker
    processes (seeded once from (seed, first round); an IterableDataset is read in its own order
    and restarted when it ends; with workers, shard it by `torch.utils.data.get_worker_info()`).
    Batches are pinned on CUDA and moved with non_blocking. `loss(model, batch)` returns the
    scalar loss of a batch.

    `autocast`: torch.bfloat16 (or float16) runs forward and loss under torch.autocast on the
    model's device (mixed precision; the parameters, the optimizer state and so every snapshot
    stay float32); None: full precision.

    `sam_rho` > 0 makes every step a SAM step (as in DFedSAM): the gradient is taken at the
    worst-case point w + rho * g / ||g|| of the neighbourhood and applied at w. Raises
    ValueError for a negative `sam_rho` or `workers`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        data: Dataset,
        loss: Callable[[nn.Module, Any], torch.Tensor],
        batch_size: int,
        seed: int,
        sam_rho: float = 0.0,
        workers: int = 0,
        autocast: torch.dtype | None = None,
    ):
        """`model`: what is trained (batches go to its device); `optimizer`: the torch optimizer stepping it; `data`:
        the training Dataset; `loss(model, batch)`: a scalar tensor; `batch_size`: samples per step (at most a
        map-style dataset's length); `seed`: seeds the sample order, with the round; `sam_rho`: SAM's radius, 0 for
        plain steps; `workers`: DataLoader processes, 0 for none; `autocast`: the mixed-precision dtype, None for full
        precision. Raises ValueError for a negative `sam_rho` or `workers`."""
        if sam_rho < 0:
            raise ValueError("sam_rho must be >= 0")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.sam_rho, self.workers, self.autocast = sam_rho, workers, autocast
        self.model, self.optimizer, self.data, self.loss = model, optimizer, data, loss
        self._tensors = data.tensors if isinstance(data, TensorDataset) and workers == 0 else None
        self.device = next(model.parameters()).device
        self.iterable = isinstance(data, IterableDataset)
        self.batch_size = batch_size if self.iterable else min(batch_size, len(data))
        self.seed = seed
        self._loader: DataLoader | None = None
        self._batches = None  # the loader's live iterator
        self._pending = None  # a batch taken by peek(), handed out by the next step

    def batch(self, idx: torch.Tensor):
        """The samples at indices `idx` (int64 (B,)) of a map-style dataset, on the model's device."""
        if self._tensors is not None:
            idx = idx.to(self._tensors[0].device)
            return tuple(t[idx] for t in self._tensors)
        return self._to_device(default_collate([self.data[i] for i in idx.tolist()]))

    def _to_device(self, batch):
        if self.device.type == "cuda":  # pinned memory lets the copy overlap the next step
            batch = pin(batch)
        return to_device(batch, self.device)

    def _from_loader(self, round_: int):
        if self._loader is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_)
            sampler = (
                None
                if self.iterable
                else RandomSampler(self.data, replacement=True, num_samples=1 << 62, generator=gen)
            )
            self._loader = DataLoader(
                self.data,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=self.workers,
                persistent_workers=self.workers > 0,
                pin_memory=self.device.type == "cuda",
                generator=gen,
            )
        for _ in range(2):  # an iterable that ended starts over once; twice: it is empty
            if self._batches is None:
                self._batches = iter(self._loader)
            try:
                return to_device(next(self._batches), self.device)
            except StopIteration:
                self._batches = None
        raise ValueError("the task's IterableDataset yields no samples")

    def peek(self):
        """One training batch on the model's device (the hooks' trial at start); a loader's batch
        is kept for the next step, so no sample is skipped."""
        if self.iterable or self.workers:
            if self._pending is None:
                self._pending = self._from_loader(0)
            return self._pending
        return self.batch(torch.arange(min(2, len(self.data))))

    def _next(self, round_: int, gen: torch.Generator):
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        if self.iterable or self.workers:
            return self._from_loader(round_)
        return self.batch(torch.randint(len(self.data), (self.batch_size,), generator=gen))

    def _loss(self, batch) -> torch.Tensor:
        if self.autocast is None:
            return self.loss(self.model, batch)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.loss(self.model, batch)

    def batches(self, round_: int) -> torch.Generator:
        """The generator of round `round_`'s batch draws (seeded by the node's seed and the round)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + round_)

    def train_round(
        self,
        round_: int,
        steps: int | None = None,
        seconds: float | None = None,
        stop=lambda: False,
        gen: torch.Generator | None = None,
    ) -> RoundStats:
        """Run `steps` steps, or as many as fit in `seconds` (at least one). `stop()` is checked
        between steps so a shutdown finishes the current step, not the round. `gen`: the round's batch
        generator (`batches`) when the round is trained in parts, so the parts draw what one call would."""
        gen = self.batches(round_) if gen is None else gen
        self.model.train()
        total_loss, done, samples = 0.0, 0, 0
        t0 = time.perf_counter()
        while True:
            if steps is not None and done >= steps:
                break
            if seconds is not None and done > 0 and time.perf_counter() - t0 >= seconds:
                break
            if done > 0 and stop():
                break
            batch = self._next(round_, gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(batch)
            loss.backward()
            if self.sam_rho > 0:
                self._sam_gradient(batch)
            self.optimizer.step()
            total_loss += float(loss.detach())
            done += 1
            samples += batch_length(batch)
        return RoundStats(total_loss / max(done, 1), done, samples, time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the loader's worker processes, if any."""
        self._batches = self._loader = self._pending = None

    def _sam_gradient(self, batch) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2) + 1e-12
        with torch.no_grad():
            shifts = [p.grad * (self.sam_rho / norm) for p in params]
            for p, e in zip(params, shifts):
                p.add_(e)
        self.optimizer.zero_grad(set_to_none=True)
        self._loss(batch).backward()
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y) as a fraction (0.0 without samples), in eval mode and batches of
    `batch_size`."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


@torch.no_grad()
def per_class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy on each class's samples of (x, y); 0 for classes with no sample."""
    model.eval()
    pred = model(x).argmax(1)
    hits = torch.zeros(num_classes, device=x.device).index_add_(0, y, (pred == y).float())
    count = torch.bincount(y, minlength=num_classes).float()
    return (hits / count.clamp_min(1)).cpu()


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load into `optimizer` a state split by optimizer_tensors: its `tensors` and `meta` (param groups and
    scalars)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

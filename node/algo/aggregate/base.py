"""What every robust aggregator shares (node/algo/aggregate/robust.py dispatches to them): the
outcome type, the context the stateful ones need, the assumed byzantine count and the weighted
mean over flat vectors."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from node.algo.averaging import weighted_sum


@dataclass
class Outcome:
    """An aggregator's result: the node's new flat float32 vector and, per neighbour set aside, the reason (a metric
    label)."""

    vector: torch.Tensor
    discarded: dict[str, str] = field(default_factory=dict)  # neighbour -> reason


@dataclass
class Context:
    """What the stateful aggregators need beyond the vectors."""

    byzantine_fraction: float = 0.25
    histories: Mapping[str, torch.Tensor] | None = None  # sybilwall: known update histories
    per_class_accuracy: Callable[[torch.Tensor], torch.Tensor] | None = None  # bristle: on own data
    familiar: torch.Tensor | None = None  # bristle: bool mask of the classes in own data
    bristle_keep: float = 0.6
    bristle_tolerance: float = 0.15
    seed: int = 0


def assumed_byzantine(n: int, fraction: float) -> int:
    """f = floor(fraction * n): how many of `n` inputs (self included) are assumed byzantine."""
    return int(math.floor(fraction * n))


def weighted_mean(own, others, self_w, weights) -> torch.Tensor:
    """(self_w * own + sum_j w_j others[j]) / (self_w + sum_j w_j) over flat float32 vectors."""
    names = list(weights)
    acc = weighted_sum([{"v": own}, *({"v": others[j]} for j in names)], [self_w, *(weights[j] for j in names)])
    return acc["v"] / (self_w + sum(weights.values()))

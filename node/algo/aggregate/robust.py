"""Byzantine-robust aggregation for one node: its own model plus its neighbours' (flat vectors).

Every aggregator takes the node's own vector, the neighbours' vectors by peer id and the
gossip (Metropolis-Hastings) weights, and returns the new own vector plus, per neighbour that
was set aside, the reason (a metric label). f, the number of byzantine inputs assumed, is
floor(byzantine_fraction * n) for n inputs (self included).

- ``mean``: the weighted gossip average (no defence; the baseline);
- ``median``: coordinate-wise median (Yin et al. 2018);
- ``trimmed_mean``: coordinate-wise mean after dropping the f largest and f smallest values;
- ``krum``: multi-Krum (Blanchard et al. 2017): score = sum of squared distances to the
  n - f - 2 nearest inputs; average the n - f best scored;
- ``clipped``: ClippedGossip (He et al. 2022): x_i + sum_j w_ij clip(x_j - x_i, tau), tau the
  median neighbour distance, so at most half the neighbours (all the far ones) are clipped;
- ``sybilwall``: FoolsGold-style down-weighting of neighbours whose update histories look
  alike (node/algo/aggregate/sybilwall.py);
- ``bristle``: distance-based prioritiser plus per-class performance check on own data
  (node/algo/aggregate/bristle.py).

Papers: median and trimmed mean, Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, arXiv 1803.01498; multi-Krum, Blanchard et al., "Machine Learning
with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017; ClippedGossip, He, Karimireddy
and Jaggi, "Byzantine-Robust Decentralized Learning via ClippedGossip", arXiv 2202.01545.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from node.algo.aggregate.base import Context, Outcome, assumed_byzantine, weighted_mean
from node.algo.aggregate.bristle import bristle
from node.algo.aggregate.sybilwall import sybilwall
from node.algo.aggregate.vectors import median
from node.registry import AGGREGATORS, check_registered

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "Context",
    "IMPLEMENTATIONS",
    "Outcome",
    "assumed_byzantine",
    "combine",
    "weighted_mean",
]


class Aggregator(Protocol):
    """How a node combines its own flat float32 vector with its neighbours' (by peer id, at least one), given the
    gossip weights and the aggregation Context: the new own vector and, per neighbour set aside, a reason label."""

    def __call__(
        self,
        own: torch.Tensor,
        others: Mapping[str, torch.Tensor],
        self_w: float,
        weights: Mapping[str, float],
        ctx: Context,
    ) -> Outcome:
        """See the class docstring."""


def _stacked(own, others) -> tuple[list[str], torch.Tensor]:
    names = sorted(others)
    return names, torch.stack([own] + [others[j] for j in names])


def _mean(own, others, self_w, weights, ctx) -> Outcome:
    return Outcome(weighted_mean(own, others, self_w, {j: weights[j] for j in sorted(others)}))


def _median(own, others, self_w, weights, ctx) -> Outcome:
    return Outcome(median(_stacked(own, others)[1]))


def _trimmed_mean(own, others, self_w, weights, ctx) -> Outcome:
    stack = _stacked(own, others)[1]
    n = len(stack)
    t = min(assumed_byzantine(n, ctx.byzantine_fraction), (n - 1) // 2)
    return Outcome(stack.sort(dim=0).values[t : n - t].mean(dim=0))


def _krum(own, others, self_w, weights, ctx) -> Outcome:
    names, stack = _stacked(own, others)
    chosen = multi_krum(stack, assumed_byzantine(len(stack), ctx.byzantine_fraction))
    return Outcome(
        stack[chosen].mean(dim=0), {j: "not_selected" for i, j in enumerate(names, start=1) if i not in chosen}
    )


# every aggregator by its name in node/registry.py (checked at import)
IMPLEMENTATIONS: dict[str, Aggregator] = {
    "mean": _mean,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "krum": _krum,
    "clipped": lambda own, others, self_w, weights, ctx: clipped_gossip(own, others, self_w, weights),
    "sybilwall": lambda own, others, self_w, weights, ctx: sybilwall(
        own, others, self_w, weights, ctx.histories or {}
    ),
    "bristle": bristle,
}
check_registered("aggregator", IMPLEMENTATIONS, AGGREGATORS)


def combine(
    name: str,
    own: torch.Tensor,
    others: Mapping[str, torch.Tensor],
    self_w: float,
    weights: Mapping[str, float],
    ctx: Context,
) -> Outcome:
    """Aggregate `own` with `others` (flat float32 vectors of one shape, by peer id) with aggregator `name` and the
    gossip weights `self_w` and `weights`; a copy of `own` when there are no others. Raises ValueError for an
    unknown name."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown aggregator {name!r}; available: {', '.join(AGGREGATORS)}")
    if not others:
        return Outcome(own.clone())
    return IMPLEMENTATIONS[name](own, others, self_w, weights, ctx)


def multi_krum(stack: torch.Tensor, f: int) -> list[int]:
    """Indices of the n - f inputs with the lowest Krum scores."""
    n = len(stack)
    closest = max(1, n - f - 2)
    d = torch.cdist(stack, stack).pow(2)
    d.fill_diagonal_(float("inf"))
    scores = d.sort(dim=1).values[:, :closest].sum(dim=1)
    return sorted(int(i) for i in scores.argsort()[: max(1, n - f)])


def clipped_gossip(own, others, self_w, weights) -> Outcome:
    """ClippedGossip (He et al. 2022): own + sum_j (w_j / total) clip(x_j - own, tau), tau the median L2 distance to
    the neighbours and total = self_w + sum_j w_j; clipped neighbours are reported as `clipped`."""
    names = sorted(others)
    diffs = {j: others[j] - own for j in names}
    dist = {j: float(d.norm()) for j, d in diffs.items()}
    tau = float(median(torch.tensor(list(dist.values()))))
    out, clipped = own.clone(), {}
    total = self_w + sum(weights[j] for j in names)
    for j in names:
        scale = min(1.0, tau / dist[j]) if dist[j] > 0 else 1.0
        if scale < 1.0:
            clipped[j] = "clipped"
        out = out + (weights[j] / total) * diffs[j] * scale
    return Outcome(out, clipped)

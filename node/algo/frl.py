"""Federated Rank Learning (FRL, Mozaffari et al. 2023): nodes never train weights; they rank
the edges of one shared, randomly initialised network and vote on the rankings.

Supermasks (edge-popup, Ramanujan et al. 2020): every Linear and Conv2d layer keeps its random
weights W frozen and learns a score per weight; the forward pass uses W * M, where the mask M
keeps the `keep` share of edges with the highest scores, and the scores get the gradient of
W * M as if M were 1 (straight-through). Weights are signed constants +-sqrt(2 / (keep *
fan_in)) (the edge-popup paper's best initialisation, scaled for the edges kept) and biases
stay at their init.

What travels is a layer's *ranking*: the permutation of its edge indices sorted by score,
ascending (int32, shape (numel,)), so `ranking[-1]` is the most important edge. A vote gives
each edge its position in each voter's ranking and sums them; the new ranking sorts the edges
by that sum (ties by index). Each voter moves any edge's sum by at most numel - 1, whatever it
sends: one vote, the paper's robustness argument. A node then reorders its own score values
to the voted ranking, keeping their distribution.

Papers: Mozaffari, Shejwalkar and Houmansadr, "FRL: Federated Rank Learning", 2021; the supermask,
Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020, arXiv
1911.13299.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ".scores"  # suffix of the score tensors in the state dict


class _TopMask(torch.autograd.Function):
    """Forward: 1 for the `keep` share of highest scores, else 0. Backward: straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:  # noqa: D102
        k = max(1, int(round(keep * scores.numel())))
        mask = torch.zeros(scores.numel(), device=scores.device, dtype=scores.dtype)
        mask[scores.detach().reshape(-1).topk(k, sorted=False).indices] = 1
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class SupermaskLinear(nn.Linear):
    """nn.Linear whose weight is masked by its top-`keep` scores (see the module docstring)."""

    keep: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear with the masked weight."""
        return F.linear(x, self.weight * _TopMask.apply(self.scores, self.keep), self.bias)


class SupermaskConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is masked by its top-`keep` scores (see the module docstring)."""

    keep: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with the masked weight."""
        return self._conv_forward(x, self.weight * _TopMask.apply(self.scores, self.keep), self.bias)


def to_supermask(model: nn.Module, keep: float, seed: int) -> nn.Module:
    """`model` (changed in place and returned) with every nn.Linear and nn.Conv2d (those exact
    types) a supermask layer: signed-constant frozen weights, frozen biases, trainable `scores`
    drawn from `seed` (the same on every node); every other parameter is frozen at its init.
    Raises ValueError for `keep` outside (0, 1] or a model without such layers."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # nothing but the scores trains (norms, embeddings included)
        p.requires_grad_(False)
    found = False
    for m in model.modules():
        kind = {nn.Linear: SupermaskLinear, nn.Conv2d: SupermaskConv2d}.get(type(m))
        if kind is None:
            continue
        found = True
        with torch.no_grad():
            w = m.weight
            fan_in = max(1, w[0].numel())
            w.copy_(torch.sign(w) * (2.0 / (keep * fan_in)) ** 0.5)  # He scale for the kept edges
            w.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            bound = 1.0 / fan_in**0.5
            scores = (torch.rand(w.shape, generator=g) * 2 - 1) * bound
        m.__class__ = kind
        m.keep = keep
        m.register_parameter("scores", nn.Parameter(scores.to(w.device)))
    if not found:
        raise ValueError("FRL needs a model with Linear or Conv2d layers to rank")
    return model


def score_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The score tensors' names in `state`, sorted."""
    return sorted(k for k in state if k.endswith(SCORES))


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """int32 (numel,): edge indices sorted by score, ascending (ties by index)."""
    flat = scores.detach().reshape(-1).cpu()
    return torch.sort(flat if flat.is_floating_point() else flat.double(), stable=True).indices.to(torch.int32)


def positions(rank: torch.Tensor) -> torch.Tensor:
    """int64 (numel,): each edge's position in `rank` (the inverse permutation)."""
    pos = torch.empty(len(rank), dtype=torch.int64)
    pos[rank.long()] = torch.arange(len(rank))
    return pos


def is_permutation(rank: torch.Tensor, numel: int) -> bool:
    """Whether `rank` is a 1-d integer tensor holding each of 0 .. numel-1 exactly once."""
    if rank.dim() != 1 or len(rank) != numel or rank.is_floating_point() or rank.dtype == torch.bool:
        return False
    return bool(torch.equal(torch.sort(rank.long()).values, torch.arange(numel)))


def vote(rankings: list[torch.Tensor]) -> torch.Tensor:
    """The ranking of the summed positions of `rankings` (each a permutation of one layer's
    edges, one vote each): int32 (numel,)."""
    total = torch.stack([positions(r) for r in rankings]).sum(0)
    return torch.sort(total, stable=True).indices.to(torch.int32)


def reorder(scores: torch.Tensor, rank: torch.Tensor) -> None:
    """Give `scores` (in place) the order of `rank`, keeping its values: the edge at position
    j of `rank` gets the j-th smallest score."""
    with torch.no_grad():
        flat = scores.view(-1)
        values = torch.sort(flat.detach()).values
        flat[rank.long().to(flat.device)] = values

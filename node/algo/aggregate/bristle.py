"""Bristle (Chen et al. 2021) for byzantine, non-IID decentralized learning, in two stages:

1. Distance-based prioritiser: keep the ``bristle_keep`` fraction of neighbours closest to the
   node's own model (L2), plus one random explorer from the rest, so a far but honest
   neighbour is still tried now and then.
2. Performance-based integrator: evaluate each kept model per class on the node's own data;
   on the classes the node knows (``familiar``), a model more than ``bristle_tolerance`` below
   the reference accuracy is rejected, and the rest are weighted by how close they come
   (weight = gossip weight * clip(1 + (acc_j - ref) / tolerance, 0, 1)). The reference is
   the lower of the node's own accuracy and the candidates' median, since the node's own
   model is flattered by its own training data.

Departure from the paper: Bristle trains only the output layer on top of a frozen,
transfer-learned feature extractor and integrates class by class; atoll's models are small and
trained end to end, so the integrator weighs whole models by their familiar-class accuracy.

Paper: "Bristle: Decentralized Federated Learning in Byzantine, Non-i.i.d. Environments", 2021.
"""

from __future__ import annotations

import math
import random

import torch

from node.algo.aggregate.base import Context, Outcome, weighted_mean
from node.algo.aggregate.vectors import median


def bristle(own, others, self_w, weights, ctx: Context) -> Outcome:
    """Bristle (2021), as in the module docstring: keep the nearest neighbours plus one random explorer,
    reject those more than `ctx.bristle_tolerance` below the reference familiar-class accuracy and weight the rest.
    Raises ValueError when `ctx` lacks `per_class_accuracy` or `familiar`."""
    if ctx.per_class_accuracy is None or ctx.familiar is None:
        raise ValueError("bristle needs the node's per-class accuracy function and familiar classes")
    names = sorted(others)
    dist = {j: float((others[j] - own).norm()) for j in names}
    ranked = sorted(names, key=lambda j: (dist[j], j))
    k = max(1, math.ceil(ctx.bristle_keep * len(names)))
    kept, rest = ranked[:k], ranked[k:]
    if rest:
        kept.append(random.Random(ctx.seed).choice(rest))  # the caller seeds by (round, node)
    discarded = {j: "not_selected" for j in names if j not in kept}
    fam = ctx.familiar

    def familiar_accuracy(vec):
        return float(ctx.per_class_accuracy(vec)[fam].mean())

    acc = {j: familiar_accuracy(others[j]) for j in kept}
    ref = min(familiar_accuracy(own), float(median(torch.tensor(list(acc.values())))))
    scaled = {}
    for j in kept:
        w = min(1.0, max(0.0, 1 + (acc[j] - ref) / ctx.bristle_tolerance))
        if w <= 0:
            discarded[j] = "rejected"
        else:
            scaled[j] = weights[j] * w
    return Outcome(weighted_mean(own, others, self_w, scaled), discarded)

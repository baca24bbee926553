"""Gossip averaging with Metropolis-Hastings weights.

W_ij = 1 / (1 + max(d_i, d_j)) for each neighbour j, W_ii = 1 - sum_j W_ij. This is
symmetric and doubly stochastic, so repeated mixing converges to the exact average. When some
neighbours did not answer this round, the weights of self and the answering neighbours are
renormalised to sum to one (nobody waits for a dead peer).

Papers: Metropolis-Hastings weights, Xiao and Boyd, "Fast linear iterations for distributed
averaging", Systems & Control Letters 2004; decentralized SGD (D-PSGD), Lian et al., NeurIPS 2017,
arXiv 1705.09056.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from node.algo.averaging import VAR_EPS, is_norm_param, rescale_variance, weighted_sum


def metropolis_hastings(my_degree: int, neighbour_degrees: Mapping[str, int]) -> tuple[float, dict[str, float]]:
    """(self weight, {neighbour: weight}) for one node."""
    w = {j: 1.0 / (1 + max(my_degree, d)) for j, d in neighbour_degrees.items()}
    return 1.0 - sum(w.values()), w


def renormalise(self_w: float, weights: Mapping[str, float], answered: set[str]) -> tuple[float, dict[str, float]]:
    """(self weight, {neighbour: weight}) restricted to the neighbours in `answered`, rescaled to sum to one with
    self."""
    kept = {j: w for j, w in weights.items() if j in answered}
    total = self_w + sum(kept.values())
    return self_w / total, {j: w / total for j, w in kept.items()}


def mix(
    own: Mapping[str, torch.Tensor],
    others: Mapping[str, Mapping[str, torch.Tensor]],
    self_w: float,
    weights: Mapping[str, float],
    correct_variance: bool = False,
    eps: float = VAR_EPS,
) -> dict[str, torch.Tensor]:
    """sum_j W_ij x_j over self and `others` (every state dict must have own's keys and shapes).

    Integer buffers (e.g. BatchNorm's num_batches_tracked) are kept from `own`. With
    `correct_variance`, each non-normalisation tensor of the result is rescaled around its mean
    to the weighted mean of the inputs' variances (as node.algo.aggregate.variance_corrected_mean
    does for a merge), so any schedule can use variance-corrected averaging."""
    names = list(weights)
    out = weighted_sum([own, *(others[j] for j in names)], [self_w, *(weights[j] for j in names)])
    for k, acc in out.items():
        v = own[k]
        if not v.is_floating_point():
            continue
        if correct_variance and acc.numel() > 1 and not is_norm_param(k):
            target = v.to(torch.float32).var() * self_w
            for j in names:
                target = target + others[j][k].to(device=v.device, dtype=torch.float32).var() * weights[j]
            acc = rescale_variance(acc, target, eps)
        out[k] = acc.to(v.dtype)
    return out

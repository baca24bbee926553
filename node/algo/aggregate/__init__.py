"""Aggregation of several state dicts into one (pure functions over tensors).

- ``mean``: the plain (optionally weighted) average.
- ``variance_corrected_mean`` ("Vanishing Variance"): averaging independently initialised
  models shrinks each layer's weight variance, which hurts the merged model. Each floating
  tensor of the average is rescaled around its mean so that its variance equals the mean of
  the inputs' variances: x <- mu + (x - mu) * sqrt(mean_i var_i / (var(x) + eps)).
  Normalisation layers (names with "norm"/"bn"/"ln", or BatchNorm running statistics) and
  non-float buffers are left as the plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from node.algo.averaging import VAR_EPS, is_norm_param, rescale_variance, weighted_sum

__all__ = ["VAR_EPS", "is_norm_param", "mean", "rescale_variance", "variance_corrected_mean", "weighted_sum"]


def mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) average of state dicts, each tensor in its own dtype. Raises ValueError
    for no states or weights that are negative, of the wrong count or sum to zero."""
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per state, with a positive sum")
    avg = weighted_sum(states, (w / w.sum()).tolist())
    return {k: v.to(states[0][k].dtype) for k, v in avg.items()}


def variance_corrected_mean(
    states: Sequence[Mapping[str, torch.Tensor]], eps: float = VAR_EPS, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """`mean`, with each non-normalisation tensor rescaled to the inputs' mean variance."""
    avg = mean(states, weights)
    for k, x in avg.items():
        if not x.is_floating_point() or x.numel() < 2 or is_norm_param(k):
            continue
        target = torch.stack([s[k].to(device=x.device, dtype=torch.float32).var() for s in states]).mean()
        avg[k] = rescale_variance(x.to(torch.float32), target, eps).to(x.dtype)
    return avg

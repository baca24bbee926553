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

import re
from collections.abc import Mapping, Sequence

import torch

_NORM = re.compile(r"(^|[._])(norm|bn|ln|batchnorm|layernorm)\d*([._]|$)|running_(mean|var)|num_batches_tracked", re.I)


def mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per state, with a positive sum")
    w = (w / w.sum()).tolist()
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = torch.zeros_like(v, dtype=torch.float32)
        for wi, s in zip(w, states):
            acc += s[k].to(device=v.device, dtype=torch.float32) * wi
        out[k] = acc.to(v.dtype)
    return out


def is_norm_param(name: str) -> bool:
    return bool(_NORM.search(name))


def variance_corrected_mean(
    states: Sequence[Mapping[str, torch.Tensor]], eps: float = 1e-4, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    avg = mean(states, weights)
    for k, x in avg.items():
        if not x.is_floating_point() or x.numel() < 2 or is_norm_param(k):
            continue
        target = torch.stack([s[k].to(device=x.device, dtype=torch.float32).var() for s in states]).mean()
        xf = x.to(torch.float32)
        mu = xf.mean()
        scale = torch.sqrt(target / (xf.var() + eps))  # node.merge applies the same formula after an all-reduce
        avg[k] = (mu + (xf - mu) * scale).to(x.dtype)
    return avg

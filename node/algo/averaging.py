"""The weighted average and the variance rescale that every averaging in atoll uses (gossip
mixing, merges, the robust aggregators' means): one implementation, below both node/comm and
node/aggregate, so neither depends on the other for it. Pure functions over tensors.

Paper: variance-corrected averaging follows "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems", 2024.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

_NORM = re.compile(r"(^|[._])(norm|bn|ln|batchnorm|layernorm)\d*([._]|$)|running_(mean|var)|num_batches_tracked", re.I)
VAR_EPS = 1e-4  # added to the variance in every rescale (variance-corrected averaging)


def weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] for every floating tensor, accumulated in float32 in the
    given order (results are float32, on the first state's devices); non-float tensors (step
    counters) are copied from states[0]. The one weighted average of atoll: mean, gossip mixing
    and the robust aggregators' means are all this."""
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.to(torch.float32) * weights[0]
        for wi, s in zip(weights[1:], states[1:]):
            acc += s[k].to(device=v.device, dtype=torch.float32) * wi
        out[k] = acc
    return out


def rescale_variance(x: torch.Tensor, target: torch.Tensor | float, eps: float = VAR_EPS) -> torch.Tensor:
    """x rescaled around its mean to variance `target` ("Vanishing Variance"):
    mu + (x - mu) * sqrt(target / (var(x) + eps)). x: float32, any shape with 2+ elements."""
    mu = x.mean()
    return mu + (x - mu) * torch.sqrt(target / (x.var() + eps))


def is_norm_param(name: str) -> bool:
    """Normalisation parameters and statistics (names with norm/bn/ln, BatchNorm's running
    statistics): variance rescaling leaves them as the plain mean."""
    return bool(_NORM.search(name))

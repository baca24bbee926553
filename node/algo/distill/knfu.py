"""KnFu's teacher weights: semantically similar neighbours count more.

Paper: "KnFu: Effective Knowledge Fusion", 2024.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def knfu_weights(own: torch.Tensor, neighbours: Mapping[str, torch.Tensor], beta: float = 10.0) -> dict[str, float]:
    """Softmax over neighbours of beta x (cosine similarity between their mean soft predictions
    on the proxy rows they sent and ours on the whole proxy set). The node's own knowledge is
    not a teacher: it is already in its model (fusing it in made KnFu no better than isolated
    training in the simulator, docs/benchmarks/distill)."""
    if not neighbours:
        return {}
    mine = F.softmax(own.float(), dim=1).mean(0)
    names = sorted(neighbours)
    sims = torch.stack(
        [F.cosine_similarity(mine, F.softmax(neighbours[n].float(), dim=1).mean(0), dim=0) for n in names]
    )
    w = torch.softmax(beta * sims, dim=0)
    return {n: float(x) for n, x in zip(names, w)}

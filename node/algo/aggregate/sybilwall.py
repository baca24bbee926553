"""SybilWall (Werthenbach and Pouwelse 2023): sybil-resistant aggregation for decentralized
learning. Each node keeps, per peer, the running sum of that peer's updates (its history),
and weights a neighbour down when its history is very similar to another peer's: k sybils of
one attacker push the same direction, honest non-IID nodes do not (FoolsGold's insight,
Fung et al. 2020). Histories of peers a node never talks to are learned by probabilistic
gossip (``merge_heard``), so sybils spread over different honest nodes are still compared.

Weights follow FoolsGold: cs = pairwise history cosine; pardoning cs_ij *= v_i / v_j when
v_j > v_i (v = each row's max); w = 1 - max_j cs_ij; w /= max(w); w = 0.99 where it is 1;
w = clip(ln(w / (1 - w)) + 0.5, 0, 1). The neighbour's gossip weight is multiplied by w.

Papers: "Towards Sybil Resilience in Decentralized Learning" (SybilWall), Werthenbach and Pouwelse,
2023; FoolsGold, Fung, Yoon and Beschastnikh, "Mitigating Sybils in Federated Learning Poisoning",
arXiv 1808.04866.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from node.algo.aggregate.base import Outcome, weighted_mean

DOWN_WEIGHTED = 0.05  # below this weight a neighbour counts as discarded in the metrics


def foolsgold_weights(histories: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """FoolsGold weights in [0, 1] by peer from its update history (Fung et al. 2020; formula in the module docstring);
    all 1.0 for fewer than two histories."""
    names = sorted(histories)
    if len(names) < 2:
        return {j: 1.0 for j in names}
    h = torch.nn.functional.normalize(torch.stack([histories[j] for j in names]), dim=1)
    cs = h @ h.T
    cs.fill_diagonal_(-1.0)
    v = cs.max(dim=1).values
    pardon = torch.where(
        v.unsqueeze(0) > v.unsqueeze(1), v.unsqueeze(1) / v.unsqueeze(0).clamp_min(1e-12), torch.ones_like(cs)
    )
    cs = cs * pardon
    w = (1 - cs.max(dim=1).values).clamp(0, 1)
    w = w / w.max().clamp_min(1e-12)
    w = torch.where(w >= 1, torch.full_like(w, 0.99), w)
    w = (torch.log(w / (1 - w)) + 0.5).clamp(0, 1)
    w = torch.nan_to_num(w, nan=0.0, neginf=0.0, posinf=1.0)
    return {j: float(w[i]) for i, j in enumerate(names)}


def sybilwall(own, others, self_w, weights, histories: Mapping[str, torch.Tensor]) -> Outcome:
    """SybilWall (Werthenbach and Pouwelse 2023): the weighted mean with each neighbour's gossip weight scaled by its
    FoolsGold weight (1.0 without a history); those below DOWN_WEIGHTED are reported as `down_weighted`."""
    fg = foolsgold_weights(histories)
    scaled = {j: weights[j] * fg.get(j, 1.0) for j in others}
    discarded = {j: "down_weighted" for j in others if fg.get(j, 1.0) < DOWN_WEIGHTED}
    return Outcome(weighted_mean(own, others, self_w, scaled), discarded)


def merge_heard(
    heard: dict[str, torch.Tensor], direct: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], me: str
) -> None:
    """Adopt a neighbour's histories of peers we have not observed ourselves (not about us)."""
    for j, h in theirs.items():
        if j != me and j not in direct:
            heard[j] = h.clone()


def gossip_partners(me: str, neighbours: list[str], probability: float, rng: random.Random) -> list[str]:
    """The neighbours this node shares its history table with this round."""
    return [j for j in neighbours if rng.random() < probability]

"""Federated distillation: nodes with different architectures teach each other through their
predictions on a shared unlabeled proxy set (pure functions; no sockets, no clocks).

- `proxy_split`: the proxy set every node derives from (data set, seed) without coordination,
  and its digest (nodes with different proxy sets must never mix logits).
- `edgefd_filter` (EdgeFD): a node keeps only the proxy samples its KMeans density-ratio
  filter judges in-distribution for its own data.
- `knfu_weights` (KnFu): neighbours weighted by the similarity of their knowledge to the
  node's own, softmax with temperature-like sharpness beta (about 10).
- `soft_targets` and `distillation_loss`: the teacher distribution and the student's loss.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import blake3
import numpy as np
import torch
import torch.nn.functional as F


def proxy_split(n_train: int, size: int, seed: int, dataset: str) -> tuple[np.ndarray, str]:
    """(sorted indices of the proxy samples within the training split, hex digest)."""
    if not 0 < size < n_train:
        raise ValueError(f"proxy size must be in (0, {n_train}), got {size}")
    idx = np.sort(np.random.default_rng([seed, 0x70B0]).choice(n_train, size=size, replace=False))
    digest = blake3.blake3(f"{dataset}:{seed}:{n_train}:".encode() + idx.astype("<i8").tobytes()).hexdigest()
    return idx, digest


def edgefd_filter(local_x: torch.Tensor, proxy_x: torch.Tensor, clusters: int = 8, quantile: float = 0.95,
                  seed: int = 0) -> np.ndarray:
    """Indices of the proxy samples that look like this node's data.

    KMeans on the node's own inputs; a proxy sample is kept when its distance to the nearest
    centroid is within the `quantile` of the node's own samples' distances, i.e. where the
    node's data density is not negligible compared with the proxy's."""
    from sklearn.cluster import KMeans

    local = local_x.reshape(len(local_x), -1).cpu().numpy().astype(np.float64)
    proxy = proxy_x.reshape(len(proxy_x), -1).cpu().numpy().astype(np.float64)
    km = KMeans(n_clusters=min(clusters, len(local)), n_init=4, random_state=seed).fit(local)
    own = km.transform(local).min(axis=1)
    threshold = np.quantile(own, quantile)
    return np.flatnonzero(km.transform(proxy).min(axis=1) <= threshold)


def knfu_weights(own: torch.Tensor, neighbours: Mapping[str, torch.Tensor], beta: float = 10.0) -> dict[str, float]:
    """Softmax over neighbours of beta x (cosine similarity between their mean soft predictions
    on the proxy set and ours): semantically distant neighbours count less."""
    if not neighbours:
        return {}
    mine = F.softmax(own.float(), dim=1).mean(0)
    names = sorted(neighbours)
    sims = torch.stack([F.cosine_similarity(mine, F.softmax(neighbours[n].float(), dim=1).mean(0), dim=0)
                        for n in names])
    w = torch.softmax(beta * sims, dim=0)
    return {n: float(x) for n, x in zip(names, w)}


def soft_targets(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 2.0) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions."""
    if not logits or len(logits) != len(weights):
        raise ValueError("one weight per teacher, at least one teacher")
    w = torch.tensor(weights, dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return sum(wi * F.softmax(l.float() / temperature, dim=1) for wi, l in zip(w, logits))


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(targets || student) at the temperature, scaled by T^2 (Hinton et al.)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, targets, reduction="batchmean") * temperature**2

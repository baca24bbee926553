"""EdgeFD's proxy filter: keep the proxy samples that look like this node's own data.

Paper: "Federated Distillation on Edge Devices: Efficient Client-Side Filtering for Non-IID Data"
(EdgeFD), 2025.
"""

from __future__ import annotations

import numpy as np
import torch


def edgefd_filter(
    local_x: torch.Tensor, proxy_x: torch.Tensor, clusters: int = 8, quantile: float = 0.95, seed: int = 0
) -> np.ndarray:
    """Sorted indices of the proxy samples that look like this node's data.

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


def speaking_rows(filtered: bool, local_x: torch.Tensor, proxy_x: torch.Tensor, seed: int = 0) -> np.ndarray:
    """The proxy rows a node publishes logits for: its EdgeFD filter's, or all of them. A filter
    that keeps nothing (data unlike anything in the proxy set) falls back to all rows, so the
    node still takes part."""
    if filtered:
        rows = edgefd_filter(local_x, proxy_x, seed=seed)
        if len(rows):
            return rows
    return np.arange(len(proxy_x))

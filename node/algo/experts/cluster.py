"""Deterministic clustering of a data set for the experts: KMeans on pixels.

Pixels rather than features of an encoder: on 8x8 digits (and 28x28 Fashion-MNIST) KMeans on
pixels already separates shapes, needs no extra training, and every node that knows (data
set, K, seed) derives the same clusters with no coordination. The centroids' digest goes into
expert records, so a router never mixes experts of different clusterings.

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450 (they cluster DINOv2
features; here pixels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Clustering:
    """A KMeans clustering of a data set: (K, D) float32 centroids in the flattened [-1, 1] pixel space, numbered by
    cluster size (largest first), and the (N,) int64 cluster of each training image."""

    centroids: torch.Tensor  # (K, D) float32, in the flattened [-1, 1] pixel space
    labels: torch.Tensor  # (N,) int64 cluster of each training image

    @property
    def k(self) -> int:
        """Number of clusters K."""
        return len(self.centroids)

    @property
    def digest(self) -> str:
        """SHA-256 hex digest of the centroids as little-endian float32 bytes: the clustering's identity in expert
        records."""
        return hashlib.sha256(self.centroids.numpy().astype("<f4").tobytes()).hexdigest()

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of each (flattened) image."""
        return torch.cdist(x.reshape(len(x), -1).float(), self.centroids).argmin(dim=1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> flattened [-1, 1] vectors, the space the experts model."""
    return x.reshape(len(x), -1).float() * 2 - 1


def from_unit(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of to_unit: (N, D) vectors, clamped to [-1, 1], as (N, *shape) images in [0, 1]."""
    return ((v.clamp(-1, 1) + 1) / 2).reshape(len(v), *shape)


def cluster(x: torch.Tensor, k: int, seed: int = 0) -> Clustering:
    """KMeans (k-means++, 10 restarts, fixed seed) on the flattened [-1, 1] pixels of `x`."""
    from sklearn.cluster import KMeans

    if not 2 <= k <= len(x):
        raise ValueError(f"need 2 <= k <= {len(x)} clusters, got {k}")
    v = to_unit(x).numpy().astype(np.float64)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(v)
    # order clusters by size, largest first, so cluster ids do not depend on KMeans' labelling
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    centroids = torch.from_numpy(km.cluster_centers_[order].astype(np.float32))
    return Clustering(centroids, torch.from_numpy(remap[km.labels_]))

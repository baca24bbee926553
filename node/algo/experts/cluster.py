"""Deterministic clustering of a data set for the experts: KMeans on pixels or on features.

`cluster` runs KMeans on the flattened pixels (on 8x8 digits that already separates shapes and
needs no extra training), or on given features, such as the penultimate features of a
classifier (node/protocol/judge.py): on 28x28 Fashion-MNIST those group garments by kind rather
than by brightness, as the paper's DINOv2 features do. Either way every node that knows (data
set, K, seed) derives the same clusters on the same machine; the digest goes into expert
records, so a router never mixes experts of different clusterings (node/task/flow.py keeps one
clustering in a file that can be copied across machines).

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450 (they cluster DINOv2
features).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Clustering:
    """A KMeans clustering of a data set: (K, F) float32 centroids in the space it was run in (flattened [-1, 1]
    pixels, or standardised features), numbered by cluster size (largest first), and the (N,) int64 cluster of each
    training image."""

    centroids: torch.Tensor  # (K, F) float32
    labels: torch.Tensor  # (N,) int64 cluster of each training image

    @property
    def k(self) -> int:
        """Number of clusters K."""
        return len(self.centroids)

    @property
    def digest(self) -> str:
        """SHA-256 hex digest of the centroids (little-endian float32) and the labels (little-endian int64): the
        clustering's identity in expert records (two files that split the data differently never share it)."""
        h = hashlib.sha256(self.centroids.numpy().astype("<f4").tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (N,) int64 of each row of x (N, F), in the clustering's own space (pixels: flattened
        images; features: the standardised features it was run on)."""
        return torch.cdist(x.reshape(len(x), -1).float(), self.centroids).argmin(dim=1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> flattened [-1, 1] vectors, the space the experts model."""
    return x.reshape(len(x), -1).float() * 2 - 1


def from_unit(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of to_unit: (N, D) vectors, clamped to [-1, 1], as (N, *shape) images in [0, 1]."""
    return ((v.clamp(-1, 1) + 1) / 2).reshape(len(v), *shape)


SPACES = ("pixels", "features")  # what KMeans runs on (experts.cluster_on)


def cluster(x: torch.Tensor, k: int, seed: int = 0, features: torch.Tensor | None = None) -> Clustering:
    """KMeans on the flattened [-1, 1] pixels of images `x` (N, ...) in [0, 1], or, when given, on `features` (N, F)
    of those images, standardised; see cluster_points."""
    if features is not None:
        return cluster_points(features, k, seed, standardise=True)
    return cluster_points(to_unit(x), k, seed)


def cluster_points(points: torch.Tensor, k: int, seed: int = 0, standardise: bool = False) -> Clustering:
    """KMeans (k-means++, 10 restarts, fixed seed, float64) on `points` (N, F); with `standardise` every feature is
    first scaled to zero mean and unit variance (features of a classifier differ widely in scale). Raises ValueError
    unless 2 <= k <= N."""
    from sklearn.cluster import KMeans

    if not 2 <= k <= len(points):
        raise ValueError(f"need 2 <= k <= {len(points)} clusters, got {k}")
    v = points.reshape(len(points), -1).double().numpy()
    if standardise:
        v = (v - v.mean(0)) / np.maximum(v.std(0), 1e-6)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(v)
    # order clusters by size, largest first, so cluster ids do not depend on KMeans' labelling
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    centroids = torch.from_numpy(km.cluster_centers_[order].astype(np.float32))
    return Clustering(centroids, torch.from_numpy(remap[km.labels_]))

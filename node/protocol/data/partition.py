"""Split training indices among nodes: iid, dirichlet(alpha) or shards.

Each node computes the same full assignment from (seed, node count) and keeps its own part,
so no coordination is needed. Every node is guaranteed at least `min_size` samples.
"""

from __future__ import annotations

import numpy as np


def partition(
    labels: np.ndarray,
    node_count: int,
    kind: str = "dirichlet",
    *,
    alpha: float = 0.5,
    shards_per_node: int = 2,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Indices for every node (sorted arrays), deterministic in the arguments."""
    labels = np.asarray(labels)
    n = len(labels)
    if node_count < 1:
        raise ValueError("node_count must be >= 1")
    if n < node_count * min_size:
        raise ValueError(f"{n} samples cannot give {node_count} nodes {min_size} samples each")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), node_count)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, node_count, alpha, rng, min_size)
    elif kind == "shards":
        parts = _shards(labels, node_count, shards_per_node, rng)
    else:
        raise ValueError(f"unknown partition {kind!r}; use iid, dirichlet or shards")
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if min(len(p) for p in parts) < min(min_size, n // node_count):
        raise ValueError(f"partition {kind} left a node with fewer than {min_size} samples")
    return parts


def _dirichlet(labels, node_count, alpha, rng, min_size, max_tries=100):
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    classes = np.unique(labels)
    for _ in range(max_tries):  # redraw until every node has enough data (bounded)
        parts = [[] for _ in range(node_count)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(node_count, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"dirichlet(alpha={alpha}) could not give every node {min_size} samples in {max_tries} draws")


def _shards(labels, node_count, shards_per_node, rng):
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, node_count * shards_per_node)
    perm = rng.permutation(len(shards))
    return [np.concatenate([shards[s] for s in perm[i::node_count]]) for i in range(node_count)]

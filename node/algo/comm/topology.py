"""Round graphs as deterministic functions of (sorted live peer ids, round, seed).

Every node that sees the same live set computes the same undirected graph without talking.
Available kinds:
- ``ring``: each node's two ring neighbours.
- ``torus``: a 2-D torus on the most square r x c grid with r * c = n (a ring when n is prime).
- ``exponential``: neighbours at distances 2^0, 2^1, ... in the ring (symmetrised).
- ``random``: a random k-regular-ish graph re-drawn every round (union of k/2 random perfect
  cycles, so every node has degree <= k), seeded by (seed, round).
- ``complete``: everyone.

Paper: the exponential graph, Ying et al., "Exponential Graph is Provably Efficient for
Decentralized Deep Training", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from node.algo.comm import seeded_rng
from node.registry import TOPOLOGIES, check_registered

Edges = set[tuple[int, int]]


class Topology(Protocol):
    """The undirected edges (a < b) of one gossip step's graph over n nodes numbered 0..n-1 in sorted peer-id order,
    from the round, the step, the seed and the random graphs' degree k: every node computes the same graph."""

    def __call__(self, n: int, round_: int, step: int, seed: int, k: int) -> Edges:
        """See the class docstring."""


def _pairs(pairs) -> Edges:
    return {(min(a, b), max(a, b)) for a, b in pairs if a != b}


def _complete(n: int, round_: int, step: int, seed: int, k: int) -> Edges:
    return _pairs((a, b) for a in range(n) for b in range(a + 1, n))


def _ring(n: int, round_: int, step: int, seed: int, k: int) -> Edges:
    return _pairs((a, (a + 1) % n) for a in range(n))


def _torus(n: int, round_: int, step: int, seed: int, k: int) -> Edges:
    rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    cols = n // rows
    out = []
    for a in range(n):
        r, c = divmod(a, cols)
        out += [(a, r * cols + (c + 1) % cols), (a, ((r + 1) % rows) * cols + c)]
    return _pairs(out)


def _exponential(n: int, round_: int, step: int, seed: int, k: int) -> Edges:
    out, hop = [], 1
    while hop < n:
        out += [(a, (a + hop) % n) for a in range(n)]
        hop *= 2
    return _pairs(out)


def _random(n: int, round_: int, step: int, seed: int, k: int) -> Edges:
    """k/2 random Hamiltonian cycles, drawn from the (seed, round, step) stream."""
    rng, out = seeded_rng("random-graph", seed, round_, step), []
    for _ in range(max(1, k // 2)):
        perm = list(range(n))
        rng.shuffle(perm)
        out += [(perm[i], perm[(i + 1) % n]) for i in range(n)]
    return _pairs(out)


# every topology by its name in node/registry.py (checked at import)
IMPLEMENTATIONS: dict[str, Topology] = {
    "ring": _ring,
    "torus": _torus,
    "exponential": _exponential,
    "random": _random,
    "complete": _complete,
}
check_registered("topology", IMPLEMENTATIONS, TOPOLOGIES)
KINDS = TOPOLOGIES


@lru_cache(maxsize=256)
def _graph(ids: tuple[str, ...], kind: str, round_: int, step: int, seed: int, k: int) -> dict[str, frozenset[str]]:
    if kind not in IMPLEMENTATIONS:
        raise ValueError(f"unknown topology {kind!r}; available: {', '.join(KINDS)}")
    adj: dict[str, set[str]] = {p: set() for p in ids}
    for a, b in IMPLEMENTATIONS[kind](len(ids), round_, step, seed, k):
        adj[ids[a]].add(ids[b])
        adj[ids[b]].add(ids[a])
    return {p: frozenset(v) for p, v in adj.items()}


def graph(
    peers: Sequence[str], kind: str = "ring", round_: int = 0, seed: int = 0, k: int = 4, *, step: int = 0
) -> dict[str, frozenset[str]]:
    """Adjacency of the graph of gossip step `step` of round `round_` over `peers` (order and
    duplicates do not matter); only `random` graphs change with the round and step."""
    random_ = kind == "random"
    return _graph(tuple(sorted(set(peers))), kind, round_ if random_ else 0, step if random_ else 0, seed, k)


def neighbours(
    peers: Sequence[str], me: str, kind: str = "ring", round_: int = 0, seed: int = 0, k: int = 4, *, step: int = 0
) -> list[str]:
    """Neighbours of `me` (excluding itself) in the step's graph over `peers` + me."""
    return sorted(graph(list(peers) + [me], kind, round_, seed, k, step=step)[me])


def degree(
    peers: Sequence[str], node: str, kind: str = "ring", round_: int = 0, seed: int = 0, k: int = 4, *, step: int = 0
) -> int:
    """Degree of `node` in the step's graph over `peers` + node."""
    return len(graph(list(peers) + [node], kind, round_, seed, k, step=step)[node])

"""Round graphs as deterministic functions of (sorted live peer ids, round, seed).

Every node that sees the same live set computes the same graph without talking.
"""

from __future__ import annotations

from typing import Sequence


def neighbours(peers: Sequence[str], me: str, kind: str = "ring", round_: int = 0, seed: int = 0) -> list[str]:
    """Neighbours of `me` (excluding itself) in the round's graph over `peers` (any order)."""
    ids = sorted(set(peers) | {me})
    n = len(ids)
    if n == 1:
        return []
    i = ids.index(me)
    if kind == "complete":
        return [p for p in ids if p != me]
    if kind == "ring":
        return sorted({ids[(i - 1) % n], ids[(i + 1) % n]} - {me})
    raise ValueError(f"unknown topology {kind!r}; available: ring, complete")


def degree(peers: Sequence[str], node: str, kind: str = "ring", round_: int = 0, seed: int = 0) -> int:
    return len(neighbours(peers, node, kind, round_, seed))

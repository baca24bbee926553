"""The arithmetic of an all-reduce done over snapshots (pure: no sockets, clocks or globals).

DiLoCo averages the swarm's pseudo-gradients with an all-reduce every round. atoll runs it without a coordinator as
a reduce-scatter then an all-gather over its own signed snapshots (node/protocol/allreduce.py does the I/O):

- the live members are cut into groups of at most `size`, drawn afresh every round from (seed, round), so that
  information crosses groups from round to round as in Moshpit SGD (arXiv 2103.03239); a swarm of at most `size`
  nodes is one group, the all-reduce of DiLoCo as published (arXiv 2311.08105);
- a member's flat vector is cut into one contiguous slice per member of its group (`bounds`); member k reduces
  slice k of every member's vector (`reduce_slice`), and everyone gathers the reduced slices: each member sends and
  receives 2 (n - 1) / n vectors, the bytes of a ring or butterfly all-reduce;
- the reduction runs over the slices in peer-id order with float64 weights, so every member (and the simulator)
  computes the same bits; `mean` is weighted by the samples behind each pseudo-gradient (nodes that ran more inner
  steps weigh more), `median` and `trimmed_mean` are coordinate-wise (Yin et al., arXiv 1803.01498) and ignore the
  weights. Rules that compare whole vectors (krum, clipped, sybilwall, bristle) cannot run on slices: an all-reduce
  refuses them (node/config/rules.py), gossip averaging runs them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

from node.algo.aggregate.base import assumed_byzantine
from node.algo.aggregate.vectors import median
from node.registry import SLICE_AGGREGATORS as RULES  # the aggregators that work slice by slice


def groups(members: Sequence[str], size: int, seed: int, round_: int) -> list[list[str]]:
    """The round's all-reduce groups: `members` (peer ids, any order) shuffled by (seed, round_) and cut into
    ceil(n / size) groups whose sizes differ by at most one, each sorted. Raises ValueError for size < 2."""
    if size < 2:
        raise ValueError(f"an all-reduce group needs at least 2 members, got size {size}")
    ids = sorted(set(members))
    if len(ids) <= size:
        return [ids] if ids else []
    random.Random(f"allreduce:{seed}:{round_}").shuffle(ids)
    count = -(-len(ids) // size)
    return [sorted(ids[i::count]) for i in range(count)]


def group_of(me: str, members: Sequence[str], size: int, seed: int, round_: int) -> list[str]:
    """The sorted group `me` belongs to this round (`me` is added to `members` if missing)."""
    return next(g for g in groups([*members, me], size, seed, round_) if me in g)


def tag(group: Sequence[str], numel: int, models: bool = False, fragment: int = 0, gather: bool = False) -> int:
    """A 63-bit tag of (the sorted group, the vector's length, whether it holds models or pseudo-gradients, which
    fragment of the model, whether whole vectors are gathered rather than slices reduced): slices cut for another
    group, model, kind of vector, fragment or scheme are told apart and refused, never summed."""
    key = f"{numel}|{int(models)}|{fragment}|{int(gather)}|{'|'.join(sorted(group))}"
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def fragments(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Streaming DiLoCo's fragments (arXiv 2501.18512): the tensors named in `sizes` (name -> values) dealt into
    `count` groups of near-equal values, largest first to the lightest group (ties: the lower index), each sorted.
    Deterministic, so every node cuts the same fragments. Raises ValueError for count < 1 or more groups than
    tensors."""
    if not 1 <= count <= len(sizes):
        raise ValueError(f"{count} fragments of {len(sizes)} tensors")
    load, out = [0] * count, [[] for _ in range(count)]
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(count), key=lambda j: (load[j], j))
        out[i].append(name)
        load[i] += sizes[name]
    return [sorted(f) for f in out]


def bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of `parts` contiguous slices of a vector of `numel` values, sizes differing by at most one.
    Raises ValueError for parts < 1."""
    if parts < 1:
        raise ValueError("at least one slice")
    base, extra = divmod(numel, parts)
    out, lo = [], 0
    for k in range(parts):
        hi = lo + base + (1 if k < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def reduce_slice(
    slices: Sequence[torch.Tensor], weights: Sequence[float], rule: str = "mean", byzantine_fraction: float = 0.25
) -> torch.Tensor:
    """One reduced slice (float32, the slices' shape) of `slices` (float32, one shape, in peer-id order):
    `mean` weighted by `weights` (samples, >= 0 with a positive sum), or coordinate-wise `median` or `trimmed_mean`
    (f = floor(byzantine_fraction * n) dropped at each end, at most (n - 1) // 2). Raises ValueError for no slices,
    bad weights or an unknown rule."""
    if not slices:
        raise ValueError("nothing to reduce")
    if rule not in RULES:
        raise ValueError(f"an all-reduce reduces with {', '.join(RULES)}, not {rule!r}")
    stack = torch.stack([s.to(torch.float32) for s in slices])
    if rule == "median":
        return median(stack)
    if rule == "trimmed_mean":
        n = len(slices)
        t = min(assumed_byzantine(n, byzantine_fraction), (n - 1) // 2)
        return stack.sort(dim=0).values[t : n - t].mean(dim=0)
    w = torch.tensor(list(weights), dtype=torch.float64)
    if len(w) != len(slices) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per slice, with a positive sum")
    w = w / w.sum()
    acc = torch.zeros(stack.shape[1:], dtype=torch.float64)
    for x, wi in zip(stack, w):
        acc += wi * x.to(torch.float64)
    return acc.to(torch.float32)

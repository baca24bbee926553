"""An all-reduce over signed snapshots, with no coordinator: reduce-scatter, then all-gather (the arithmetic and its
papers: node/algo/comm/allreduce.py).

Round r, for a member at position k of its group of n (node.algo.comm.allreduce.group_of), and fragment f of the
model (Streaming DiLoCo's, node/protocol/rounds/streaming.py; f = 0 for the whole model):
1. its flat vector x (plus, with comm.error_feedback, what the codec dropped before: SparseLoCo's error feedback,
   arXiv 2508.15706) is cut into n slices, each coded with comm.codec; it publishes slice j as snapshot
   (shard, r, f * STRIDE + j) for every other member j, with the samples behind it and the group's tag;
2. it fetches (shard, r, f * STRIDE + k) from every other member and reduces slice k (`security.aggregator`: the
   mean weighted by samples, or the coordinate-wise median or trimmed mean), in peer-id order;
3. it publishes the reduced slice as (shard, r, f * STRIDE + REDUCED) (coded with comm.codec when that codec is
   dense; a sparse codec would drop most of a sum, so it then travels as int8), and fetches every other member's.
   Pseudo-gradients under a sparse codec (topk, topk2bit) or a robust rule (median, trimmed_mean) skip the
   reduce-scatter: each member publishes its whole coded vector once, as (shard, r, f * STRIDE), and reduces
   everyone's itself, an all-gather as SparseLoCo does: n - 1 coded vectors received. Under a sparse codec that is
   fewer bytes than dense reduced slices (while n times the codec's share stays under 2 (n - 1) / n of int8's);
   under a robust rule it is what makes the rule hold, as the owner of a slice would otherwise decide it for all;
4. the result is the reduced slices in order. A slice whose part or whose owner did not arrive by comm.fetch_timeout
   is the member's own (its pseudo-gradient there, not the average), and the result says which owners answered.

Every member decodes the same bytes and reduces in the same order, so all members (and the simulator, which runs
this code over its in-memory exchange) hold the same bits. Bytes per member and round: 2 (n - 1) / n coded vectors
(n - 1 under a sparse codec or a robust rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from node.algo.aggregate.vectors import flatten, unflatten
from node.algo.comm.allreduce import bounds, group_of, reduce_slice, tag
from p2pd.codecs import Codec, decode
from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey

# Fragment f's snapshots take steps f * STRIDE + j (its slice for member j) and f * STRIDE + REDUCED (the reduced
# slice): in the order a node publishes them, as a fetcher takes a peer whose record shows a later step for one that
# moved past the snapshot it waits for.
STRIDE = 32
MAX_WEIGHT = 2.0**40  # samples a slice may claim: sums stay finite (the robust rules ignore the claims)
REDUCED = STRIDE - 1  # more than the largest group (comm.allreduce_group <= 16)
SPARSE = ("topk", "topk2bit")


@dataclass
class Reduced:
    """What one all-reduce gave: `vector` (flat float32, the input's length), the sorted `group`, and `answered`: the
    other members whose reduced slice arrived (the others' slices are this member's own)."""

    vector: torch.Tensor
    group: list[str]
    answered: list[str] = field(default_factory=list)


def _check(own_tag: int, lengths: set[int], reduced: bool):
    """The `accept` of a slice snapshot: names, dtype, a length in `lengths` and the tag as this member expects;
    ReasonedError (incompatible) otherwise."""

    def accept(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = {"g", "w", "tag"} | ({"n"} if reduced else set())
        g, w, t = theirs.get("g"), theirs.get("w"), theirs.get("tag")
        if (
            set(theirs) != names
            or g is None
            or g.dtype != torch.float32
            or g.dim() != 1
            or g.numel() not in lengths
            or w is None
            or w.dtype != torch.float64
            or w.numel() != 1
            or not bool(torch.isfinite(w).all())
            or not 0 <= float(w) <= MAX_WEIGHT
            or t is None
            or t.dtype != torch.int64
            or t.numel() != 1
            or int(t) != own_tag
        ):
            raise ReasonedError("incompatible", "slice does not fit this all-reduce (another group, model or layout)")
        return theirs

    return accept


class SlicedAllReduce:
    """One node's side of the all-reduce (see the module docstring). `residual`: with error feedback, what the codec
    dropped so far, per fragment (flat float32)."""

    def __init__(self, comm, security, seed: int):
        """`comm`: the CommConfig (`allreduce_group`, `codec`, `topk_ratio`, `int8_block`, `error_feedback`);
        `security`: the SecurityConfig (`aggregator` one of node.algo.comm.allreduce.RULES, `byzantine_fraction`);
        `seed`: train.seed (the groups of every round). Raises ValueError for a codec setting out of range."""
        self.size, self.seed = comm.allreduce_group, seed
        self.codec = Codec(comm.codec, comm.topk_ratio, comm.int8_block)
        # what sparse codecs leave to a dense one: sums (reduced slices) and models
        self.dense = Codec("int8", block=comm.int8_block) if comm.codec in SPARSE else self.codec
        self.feedback = comm.error_feedback
        self.rule, self.fraction = security.aggregator, security.byzantine_fraction
        self.residual: dict[int, torch.Tensor] = {}  # per fragment

    def _coded(self, x: torch.Tensor, codec: Codec):
        """(what travels, what a receiver decodes) for slice `x` under `codec`."""
        if codec.name == "none" or not codec.applies("g", x):
            return x, x
        c = codec.encode(x)
        return c, decode(c).to(torch.float32)

    def plan(self, exchange, r: int) -> tuple[list[str], bool]:
        """(this member's sorted group in round `r`, whether the live swarm is cut into several groups)."""
        everyone = [m.peer_id for m in exchange.members(r)]
        return group_of(exchange.me, everyone, self.size, self.seed, r), len({*everyone, exchange.me}) > self.size

    def pseudo_gradient(
        self, exchange, r: int, start: dict, after: dict, keys: list[str], weight: float, fragment: int = 0, **record
    ) -> tuple[Reduced, dict[str, torch.Tensor]]:
        """(the all-reduce's Reduced, the group's average pseudo-gradient of tensors `keys`, shaped as `start`'s) for
        a member whose tensors went from `start` (the shared parameters) to `after` (what it publishes), `weight`
        samples behind it. One group averages pseudo-gradients; a swarm cut into several averages the models, so
        start - average also pulls this member towards the group's parameters (see `run` for the rest)."""
        origin, mine = flatten(start, keys), flatten(after, keys)
        group, several = self.plan(exchange, r)
        done = self.run(exchange, r, group, mine if several else origin - mine, weight, several, fragment, **record)
        g = unflatten(origin - done.vector if several else done.vector, {k: start[k] for k in keys}, keys)
        return done, g

    def run(
        self,
        exchange,
        r: int,
        group: list[str],
        vector: torch.Tensor,
        weight: float,
        models: bool,
        fragment: int = 0,
        **record,
    ) -> Reduced:
        """All-reduce `vector` (flat float32 CPU) with `group` (from `plan`) through `exchange`
        (node.protocol.exchange), `weight`: the samples behind it (> 0); `models`: the vector is a model, not a
        pseudo-gradient (a dense codec, no error feedback); `fragment`: which of Streaming DiLoCo's fragments (0 for
        the whole model); `record`: progress fields for the peer record. Raises ValueError for a vector that is not
        flat float32."""
        if vector.dtype != torch.float32 or vector.dim() != 1:
            raise ValueError("the all-reduce takes one flat float32 vector")
        me = exchange.me
        n, k = len(group), group.index(me)
        feedback = self.feedback and not models
        residual = self.residual.get(fragment)
        x = vector + residual if feedback and residual is not None and residual.shape == vector.shape else vector
        cuts = bounds(x.numel(), n)
        # whole vectors, each member reducing them itself: under a sparse codec (fewer bytes), and under a robust rule,
        # which a byzantine owner of a slice could otherwise decide for everyone
        gather = not models and (self.codec.name in SPARSE or self.rule != "mean")
        marked = tag(group, x.numel(), models, fragment, gather)
        mark = {"w": torch.tensor([float(weight)], dtype=torch.float64), "tag": torch.tensor([marked])}
        if gather:
            return self._gather(exchange, r, group, x, mark, fragment, record)
        sent = []  # each slice as its receiver decodes it
        for j, (lo, hi) in enumerate(cuts):
            wire, seen = self._coded(x[lo:hi].clone(), self.dense if models else self.codec)
            sent.append(seen)
            if j != k:
                exchange.publish(SnapshotKey("shard", r, fragment * STRIDE + j), {"g": wire, **mark}, **record)
        if feedback:
            self.residual[fragment] = x - torch.cat(sent)
        if n == 1:
            exchange.note(r, 0, **record)
            return Reduced(torch.cat(sent), group)
        others = [p for p in group if p != me]
        lo, hi = cuts[k]
        parts = exchange.fetch_many(
            others, SnapshotKey("shard", r, fragment * STRIDE + k), _check(marked, {hi - lo}, False)
        )
        reduced, total, count = self._reduce(me, sent[k], float(weight), parts)
        wire, seen = self._coded(reduced, self.dense)
        reduced_snapshot = {"g": wire, "w": total, "tag": mark["tag"], "n": count}
        exchange.publish(SnapshotKey("shard", r, fragment * STRIDE + REDUCED), reduced_snapshot, **record)
        lengths = {b - a for a, b in cuts}
        got = exchange.fetch_many(
            others, SnapshotKey("shard", r, fragment * STRIDE + REDUCED), _check(marked, lengths, True)
        )
        gathered = {p: got[p]["g"] for j, p in enumerate(group) if p in got and got[p]["g"].numel() == len(sent[j])}
        slices = [seen if p == me else gathered.get(p, sent[j]) for j, p in enumerate(group)]
        return Reduced(torch.cat(slices), group, sorted(gathered))

    def _gather(self, exchange, r: int, group: list[str], x: torch.Tensor, mark: dict, fragment: int, record):
        """The all-gather of whole coded vectors that sparse codecs take (see the module docstring)."""
        me, key = exchange.me, SnapshotKey("shard", r, fragment * STRIDE)
        wire, seen = self._coded(x.clone(), self.codec)
        if self.feedback:
            self.residual[fragment] = x - seen
        if len(group) == 1:
            exchange.note(r, 0, **record)
            return Reduced(seen, group)
        exchange.publish(key, {"g": wire, **mark}, **record)
        got = exchange.fetch_many([p for p in group if p != me], key, _check(int(mark["tag"]), {x.numel()}, False))
        return Reduced(self._reduce(me, seen, float(mark["w"]), got)[0], group, sorted(got))

    def _reduce(
        self, me: str, own: torch.Tensor, weight: float, got: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the reduction of `own` with the vectors `got` holds, in peer-id order; the samples behind it, float64;
        how many vectors, int64)."""
        entries = {me: (own, weight)} | {p: (s["g"], float(s["w"])) for p, s in got.items()}
        who = sorted(entries)
        reduced = reduce_slice([entries[p][0] for p in who], [entries[p][1] for p in who], self.rule, self.fraction)
        total = torch.tensor([sum(entries[p][1] for p in who)], dtype=torch.float64)
        return reduced, total, torch.tensor([len(who)])

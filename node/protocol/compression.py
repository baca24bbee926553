"""Compressed gossip (`comm.codec`, `comm.error_feedback`): what a node publishes at each
gossip step and how it reads what its neighbours published. Codecs: p2pd/codecs.py.

- `codec: none`: the model, raw (plain gossip).
- a dense codec (fp16, bf16, int8) without error feedback: the model, coded (what hivemind
  and OpenDiLoCo send); receivers mix the decoded models.
- `error_feedback: true` (CHOCO-SGD, Koloskova et al. 2019): every node i keeps a public
  estimate x̂_i of its model, which its neighbours hold too. Each step it sends
  q_i = Q(x_i - x̂_i) (kind `delta`), both sides add q_i to their copy of x̂_i, and i moves
  x_i <- x_i + gamma * sum_j w_ij (x̂_j - x̂_i). What the codec drops stays in x_i - x̂_i and
  goes out in a later step, so compression error does not accumulate.
- `codec: topk` without error feedback: q_i = Q(x_i - x_i'), the top-k of the change since the
  last step, whatever it drops is lost (a top-k of the model itself would be mostly zeros):
  the ablation that shows what error feedback is for.

The bookkeeping (estimates, copies, lineage) is node/algo/choco.py's, with no I/O; this module
publishes and fetches what it computes. Keeping copies in step: a delta names its predecessor
(`_choco.prev`: round, step) and its
lineage (`_choco.epoch`); a receiver adds it to its copy only if the copy is at that
predecessor of that lineage. Otherwise (first contact, a missed step, the sender restarted or
redid a round) it fetches the estimate itself (kind `estimate`, raw) once and goes on from
there. Nodes that start together at round 0 begin from the shared initial model, whose bytes
give the first lineage's epoch, so they never need an estimate.

Robust aggregation sees neighbour j as x_i + (x̂_j - x̂_i): with a lossless codec and gamma = 1
that is x_j, and the step is plain gossip. Integer tensors (step counters) travel as values.

Paper: CHOCO-SGD, Koloskova, Stich and Jaggi, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication", ICML 2019, arXiv 1902.00340.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import torch

from node.algo.choco import Choco
from node.protocol.exchange import model_like
from p2pd.codecs import Codec, decompress
from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey

EPOCH, PREV, AT = "_choco.epoch", "_choco.prev", "_choco.at"
SPARSE = ("topk", "topk2bit")  # codecs that drop values: they always send deltas against estimates


def default_step(comm) -> float:
    """CHOCO's consensus step size gamma where `comm.consensus_step` is unset: 1 for the dense
    codecs (their error is small), 0.25 + 5 x topk_ratio (at most 1) for top-k: sparser
    updates need a smaller step to stay stable (the best of a sweep on digits at 1, 5 and 10%,
    docs/benchmarks/compression)."""
    return min(1.0, 0.25 + 5 * comm.topk_ratio) if comm.codec in SPARSE else 1.0


def record_codec(comm) -> str:
    """The codec as a peer record names it (`comm` a CommConfig), e.g. `int8`, `topk+ef`, `none`."""
    return comm.codec + ("+ef" if comm.error_feedback else "")


def sends_deltas(record_codec_name: str) -> bool:
    """Whether a node whose record names this codec publishes deltas (CompressedGossip.tracked)."""
    return record_codec_name.endswith("+ef") or record_codec_name.split("+")[0] in SPARSE


class CompressedGossip:
    """One node's side of compressed gossip for `comm` (a CommConfig); see the module docstring.
    `codec.name == "none"` and no error feedback: plain gossip, nothing kept. The CHOCO-SGD
    bookkeeping is node/algo/choco.py's (no I/O); this class publishes and fetches for it."""

    def __init__(self, comm, rng: random.Random | None = None):
        """`comm`: the node's CommConfig: `codec`, `topk_ratio` and `int8_block` make the codec, `error_feedback` (or a
        top-k codec) makes it send deltas, `consensus_step` is gamma (None or 0: default_step); `rng`: where the
        lineage ids of this node's own restarts come from (default: a generator seeded from the OS). Raises
        ValueError for a codec setting out of range (p2pd.codecs.Codec)."""
        self.codec = Codec(comm.codec, comm.topk_ratio, comm.int8_block)
        self.feedback = comm.error_feedback
        # differences from estimates both sides keep: error feedback, or top-k (see above)
        self.tracked = sends_deltas(record_codec(comm))
        self.gamma = comm.consensus_step or default_step(comm)
        self.choco = Choco(self.codec.compress, decompress, self.feedback, self.gamma, rng or random.Random())

    @property
    def resyncs(self) -> int:
        """Estimates fetched (full-size transfers), for tests and benchmarks."""
        return self.choco.resyncs

    def begin(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        """Before this process's first round: at round 0 `state` is the shared initial model
        and starts the common lineage; a resumed node starts a lineage of its own."""
        if self.tracked:
            self.choco.begin(round_, state)

    def publish(self, exchange, round_: int, step: int, own: dict[str, torch.Tensor], **record) -> None:
        """Publish step (round_, step)'s snapshot of `own` (the model, or the delta and the
        estimate) through `exchange`, with `record` fields."""
        if not self.tracked:
            coded = own if self.codec.name == "none" else self.codec.compress(own)
            exchange.publish(SnapshotKey("model", round_, step), coded, **record)
            return
        out = self.choco.outgoing(round_, step, own)
        meta = {EPOCH: torch.tensor([out.epoch]), PREV: torch.tensor(out.prev)}
        try:  # the estimate first: a neighbour that sees the delta and needs the estimate finds it
            estimate = {**out.estimate, EPOCH: meta[EPOCH], AT: torch.tensor([round_, step])}
            exchange.publish(SnapshotKey("estimate", round_, step), estimate)
            exchange.publish(SnapshotKey("delta", round_, step), {**out.delta, **meta}, **record)
        except BaseException:  # maybe published, maybe not: whatever comes next starts a new lineage
            self.choco.lost_track()
            raise
        self.choco.commit(out)  # only once published: receivers' copies and ours move together

    def gather(
        self, exchange, peers: Iterable[str], round_: int, step: int, own: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """{peer: its model as this node sees it} for the `peers` that delivered step
        (round_, step): their model (untracked), or own + (x̂_j - x̂_i)."""
        peers = list(peers)
        if not self.tracked:
            return exchange.fetch_many(peers, SnapshotKey("model", round_, step), model_like(own))
        got = exchange.fetch_many(peers, SnapshotKey("delta", round_, step), _with_meta(own, PREV))
        resync = self.choco.receive(round_, step, got)
        if resync:
            key = SnapshotKey("estimate", round_, step)
            estimates = exchange.fetch_many(resync, key, _with_meta(own, AT))
            self.choco.resynced({j: got[j][0] for j in resync}, (round_, step), estimates, own)
        return self.choco.views(got, (round_, step), own)

    def blend(self, own: dict[str, torch.Tensor], mixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The consensus step: own + gamma (mixed - own) for floating tensors (gamma = 1: mixed)."""
        return self.choco.blend(own, mixed)

    def forget(self, live: set[str]) -> None:
        """Drop the copies of peers that are no longer members."""
        self.choco.forget(live)


def _with_meta(own: dict[str, torch.Tensor], position: str):
    """Accept a delta (`position` PREV) or an estimate (AT): own's tensors plus the lineage and
    a (round, step) pair; returns (epoch, (round, step), tensors). Raises ReasonedError."""
    fits = model_like(own)

    def accept(theirs: dict[str, torch.Tensor]):
        epoch, where = theirs.get(EPOCH), theirs.get(position)
        if (
            epoch is None
            or where is None
            or epoch.dtype != torch.int64
            or epoch.shape != (1,)
            or where.dtype != torch.int64
            or where.shape != (2,)
        ):
            raise ReasonedError("incompatible", "a compressed-gossip snapshot without its lineage")
        tensors = fits({k: v for k, v in theirs.items() if k not in (EPOCH, position)})
        return int(epoch[0]), (int(where[0]), int(where[1])), tensors

    return accept

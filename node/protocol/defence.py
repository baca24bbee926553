"""One node's defence: trust signals from what it received, then a (robust) aggregation.

The daemon and the simulator both call ``Defence.step`` once per gossip exchange, so the
trust scores a daemon exports are the ones the benchmark measures precision and recall of.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from node.algo.aggregate.robust import Context, Outcome, combine
from node.algo.aggregate.vectors import flatten, float_keys, unflatten
from node.algo.comm.mixing import mix
from node.algo.security.trust import Signals, TrustTracker
from node.protocol.train import per_class_accuracy

BRISTLE_SAMPLES = 256  # own samples the per-class check runs on


class Defence:
    """One node's defence: a TrustTracker over the models it receives and the aggregator `aggregator`; for `bristle`
    also the per-class accuracy check on up to BRISTLE_SAMPLES of its own samples and the classes it holds.
    `keys`: the state-dict entries it compares (default: every float tensor of `model`)."""

    def __init__(
        self,
        aggregator: str,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        byzantine_fraction: float = 0.25,
        seed: int = 0,
        tracker: TrustTracker | None = None,
        keys: list[str] | None = None,
    ):
        """`aggregator`: a name of AGGREGATORS (node/algo/aggregate/robust.py); `model`: the node's model (bristle
        checks copies of it); `x`, `y`: its samples (N, ...) and int64 labels (N,) on the model's device, None for an
        unlabelled task (not with bristle); `num_classes`: class count; `byzantine_fraction`: share of each step's
        inputs assumed malicious (f = floor(fraction * n)); `seed`: seeds bristle's sample and, with the round, the
        aggregators' draws; `tracker`: the TrustTracker, None builds a default one; `keys`: the state-dict entries
        compared (None: every float tensor)."""
        self.aggregator = aggregator
        self.tracker = tracker or TrustTracker()
        self.byzantine_fraction = byzantine_fraction
        self.seed = seed
        self.keys = keys if keys is not None else float_keys(model.state_dict())
        self._per_class = None
        self.familiar = None
        if aggregator == "bristle":
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(y), generator=gen)[:BRISTLE_SAMPLES].to(y.device)
            xv, yv = x[pick], y[pick]
            counts = torch.bincount(y.cpu(), minlength=num_classes)
            self.familiar = counts >= max(2, int(0.02 * len(y)))
            scratch = copy.deepcopy(model)
            template = scratch.state_dict()

            def per_class(vec: torch.Tensor) -> torch.Tensor:
                scratch.load_state_dict(unflatten(vec, template))
                return per_class_accuracy(scratch, xv, yv, num_classes)

            self._per_class = per_class

    def step(
        self,
        round_: int,
        ref: Mapping[str, torch.Tensor],
        own: Mapping[str, torch.Tensor],
        others: Mapping[str, Mapping[str, torch.Tensor]],
        self_w: float,
        weights: Mapping[str, float],
        correct_variance: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Signals], Outcome]:
        """(new own state, per-neighbour signals, the aggregation outcome). `ref` is the node's
        model before this exchange's local training: updates are measured from it."""
        own_v, ref_v = flatten(own, self.keys), flatten(ref, self.keys)
        vecs = {j: flatten(s, self.keys) for j, s in others.items()}
        signals = self.tracker.observe(ref_v, own_v, vecs)
        clipped = clip_flagged(ref_v, own_v, vecs, self.tracker.suspects(signals))
        if self.aggregator == "mean":  # plain gossip, with optional variance correction
            others = {j: unflatten(vecs[j], s, self.keys) if j in clipped else s for j, s in others.items()}
            return mix(own, others, self_w, weights, correct_variance), signals, Outcome(own_v, clipped)
        ctx = Context(
            byzantine_fraction=self.byzantine_fraction,
            histories=self.tracker.known_histories(),
            per_class_accuracy=self._per_class,
            familiar=self.familiar,
            seed=self.seed * 1_000_003 + round_,
        )
        out = combine(self.aggregator, own_v, vecs, self_w, weights, ctx)
        out.discarded = {**clipped, **out.discarded}
        return unflatten(out.vector, own), signals, out


def clip_flagged(
    ref: torch.Tensor, own: torch.Tensor, vecs: dict[str, torch.Tensor], flagged: set[str]
) -> dict[str, str]:
    """Clip, in place in `vecs`, the update x_j - ref of every flagged neighbour j to tau, the median update norm of
    this node and its unflagged neighbours (ClippedGossip's rule, He et al. 2022, arXiv 2202.01545, applied to the
    peers the trust tracker flagged): whatever the aggregator, a flagged peer never weighs in with more than an
    ordinary update. Flat float32 vectors; returns {j: "clipped"} for those actually shortened."""
    if not flagged:
        return {}
    norms = torch.stack([(own - ref).norm()] + [(v - ref).norm() for j, v in vecs.items() if j not in flagged])
    tau = float(norms.median())
    out = {}
    for j in sorted(flagged & set(vecs)):
        update = vecs[j] - ref
        size = float(update.norm())
        if size > tau:
            vecs[j] = ref + update * (tau / size)
            out[j] = "clipped"
    return out

"""Decentralized SGD: per round, local training, then the round's gossip steps.

Round r (steps per round from `node.algo.comm.schedule.allotment`: constant = D-PSGD with one step
a round or multi-step gossip (MGS) with several; late = a late-concentrated budget):
1. train locally for the round's budget (steps or seconds);
2. for each gossip step q: publish the model as snapshot (model, r, q); fetch the same key
   from the neighbours of step q's graph over the live members (`node.algo.comm.topology`);
   combine with Metropolis-Hastings weights renormalised over the neighbours that answered,
   through the node's `Defence` (plain or variance-corrected mixing for `aggregator: mean`,
   else the robust aggregator), which also scores every neighbour (trust, sybil flags);
3. a round without gossip steps only notes its progress.

With `comm.codec` / `comm.error_feedback` the snapshots travel coded, or as CHOCO-SGD deltas
of public estimates (node/protocol/compression.py); the robust aggregators see each neighbour's
model as this node reconstructs it, and the consensus step size scales the mix.

Papers: D-PSGD, Lian et al., arXiv 1705.09056; MGS and DFedSAM, Shi et al., arXiv 2302.04083.
"""

from __future__ import annotations

import logging

from node.algo.comm.mixing import metropolis_hastings, renormalise
from node.algo.comm.schedule import allotment
from node.algo.comm.topology import graph
from node.protocol.compression import CompressedGossip
from node.protocol.rounds import RoundResult, Rounds
from node.protocol.worker import NonFinite

log = logging.getLogger("atoll.gossip")


class GossipRounds(Rounds):
    """Gossip rounds of one node. `forger` (None in production) is installed by attack
    rehearsals (node/protocol/rehearsal.py) to publish a forgery in place of the model."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`: the node's NodeConfig (`comm` and `train.rounds` give every round's gossip steps and the codec);
        `worker`: its Worker; `exchange`: its Exchange. Raises ValueError for an unknown comm.schedule or a setting out
        of range (node.algo.comm.schedule.allotment, p2pd.codecs.Codec)."""
        self.cfg, self.worker, self.exchange = cfg, worker, exchange
        c = cfg.comm
        budget = cfg.train.rounds if c.gossip_budget is None else c.gossip_budget
        self.steps = allotment(c.schedule, cfg.train.rounds, budget, c.late_shape)
        self.forger = None
        self.compression = CompressedGossip(c)
        self._flagged: set[str] = set()

    def run(self, r: int) -> RoundResult:
        """Round r: local training, then the round's gossip steps. Raises NonFinite."""
        w = self.worker
        self.compression.begin(r, w.state())
        start = w.round_start()  # updates are measured from here
        result = RoundResult(w.train(r, stop=self.exchange.stopping))
        sps = round(result.stats.samples_per_second, 3)
        if self.exchange.stopping():
            return result
        for q in range(self.steps[r] if r < len(self.steps) else 0):
            self._step(r, q, start if q == 0 else None, result, sps)
            if self.exchange.stopping():
                return result
        if not self.steps[r]:
            self.exchange.note(r, 0, samples_per_second=sps)
        return result

    def _step(self, r: int, q: int, start: dict | None, result: RoundResult, sps: float) -> None:
        """Gossip step q of round r; updates `result` (mixed, members, discarded)."""
        c, me, w = self.cfg.comm, self.exchange.me, self.worker
        own = w.state()
        if start is None and not w.all_finite():  # the last step's mix: never publish NaN/Inf
            raise NonFinite("model_after_mixing")
        ref = start if start is not None else own
        published = own if self.forger is None else self.forger.forge(ref, own, r, q)
        self.compression.publish(self.exchange, r, q, published, samples_per_second=sps)
        members = self.exchange.members(r)
        result.members = len(members)
        g = graph([m.peer_id for m in members] + [me], c.topology, r, self.cfg.train.seed, c.random_degree, step=q)
        nbrs = sorted(g[me])
        if not nbrs:
            return
        self_w, weights = metropolis_hastings(len(g[me]), {j: len(g[j]) for j in nbrs})
        self.compression.forget({m.peer_id for m in members})
        answered = self.compression.gather(self.exchange, nbrs, r, q, own)
        if not answered:
            return
        self_w, weights = renormalise(self_w, weights, set(answered))
        mixed, signals, outcome = w.defence.step(r, ref, own, answered, self_w, weights, c.mix_variance_correction)
        result.discarded.update(outcome.discarded)
        self._say_flags(r, signals)
        w.defence.tracker.forget({m.peer_id for m in members})
        if self.forger is not None:
            self.forger.saw(answered)
            if not self.forger.mixes:
                return
        w.load(self.compression.blend(own, mixed))
        result.mixed = sorted(answered)

    def _say_flags(self, r: int, signals: dict) -> None:
        for j, s in sorted(signals.items()):
            if s.flagged and j not in self._flagged:
                log.warning(
                    "peer %s flagged in round %d: trust %.2f, %s",
                    j,
                    r,
                    s.trust,
                    "suspected sybil" if s.sybil else f"norm ratio {s.norm_ratio:.1f}, cosine {s.cos_consensus:.2f}",
                )
        self._flagged = {j for j, s in signals.items() if s.flagged} | (self._flagged - set(signals))

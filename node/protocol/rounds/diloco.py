"""DiLoCo-class rounds with no coordinator (`comm.algorithm: diloco`): inner steps, then an outer step on the
pseudo-gradient averaged over the round's gossip graph.

Round r of node i, from its parameters theta_i:
1. H = train.local_steps inner steps of the task's optimizer (its state stays with the node across rounds; with
   train.local_seconds, nodes take different numbers of steps);
2. publish theta_i' (the parameters after the inner steps) as snapshot (model, r, 0), coded as the codec says
   (CHOCO-SGD estimates with comm.error_feedback: node/protocol/compression.py), and fetch the neighbours' of the
   round's graph over the live members;
3. combine theta_i' with them through the node's defence, measured from theta_i (node/protocol/defence.py: plain
   Metropolis-Hastings mixing for `aggregator: mean`, else the robust aggregator, with the trust tracker's
   scores): the result m_i; theta_i - m_i is then the average of the pseudo-gradients theta_j - theta_j' where
   the nodes began the round together, plus a pull towards the neighbours' parameters where they did not (as
   NoLoCo's modified momentum, so no step needs every node);
4. the outer step (node/algo/diloco.py): Nesterov SGD with comm.outer_lr and comm.outer_momentum on theta_i - m_i,
   from theta_i, with the node's own momentum buffers.

With `comm.outer_average: all_reduce`, steps 2-3 are instead an all-reduce of the pseudo-gradients theta_i - theta_i'
in groups of comm.allreduce_group (node/protocol/allreduce.py: reduce-scatter then all-gather over signed snapshots,
no coordinator), each weighted by the samples behind it, so every member of a group takes the same outer step (DiLoCo
as published when the swarm is one group). Codecs there code the pseudo-gradient, with SparseLoCo's error feedback;
the aggregator works slice by slice (mean, median, trimmed_mean); the trust tracker does not run (it needs whole
updates, which no member of an all-reduce sees).

In gossip averaging, every robust aggregator, the trust tracker and the attack rehearsals work unchanged: an update
is measured from the round's start, so what they judge is each neighbour's pseudo-gradient (a forger of sign_flip
publishes theta - s (theta' - theta): its pseudo-gradient reversed and amplified). On a complete graph with plain
mixing, every node takes the exact average of every pseudo-gradient (DiLoCo as published, without its all-reduce).

Papers: DiLoCo, arXiv 2311.08105; NoLoCo, arXiv 2506.10911; CHOCO-SGD, arXiv 1902.00340; SparseLoCo,
arXiv 2508.15706; Moshpit SGD, arXiv 2103.03239.
"""

from __future__ import annotations

import torch

from node.algo.aggregate.vectors import float_keys
from node.algo.diloco import nesterov, outer_step
from node.protocol.allreduce import SlicedAllReduce
from node.protocol.rounds import RoundResult
from node.protocol.rounds.gossip import GossipRounds
from node.protocol.rounds.streaming import Stream, fitting


class DiLoCoRounds(GossipRounds):
    """DiLoCo rounds of one node (see the module docstring); the gossip step is GossipRounds'. `momentum`: the
    outer optimizer's buffers (None before the first outer step)."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`: the node's NodeConfig (`comm.outer_lr`, `comm.outer_momentum`, the gossip graph and codec);
        `worker`: its Worker (the inner optimizer is its own); `exchange`: its Exchange. Raises ValueError for a
        codec setting out of range."""
        super().__init__(cfg, worker, exchange)
        self.momentum = None
        self.allreduce = (
            SlicedAllReduce(cfg.comm, cfg.security, cfg.train.seed) if cfg.comm.outer_average == "all_reduce" else None
        )
        streamed = cfg.comm.fragments > 1 or cfg.comm.sync_delay > 0
        self.stream = Stream(cfg, worker, exchange, self.allreduce) if streamed else None
        worker.outer.attach(self)  # checkpoints keep the outer momentum (a resumed node loads it here)

    def run(self, r: int) -> RoundResult:
        """Round r: inner steps, one gossip step of the parameters (or the all-reduce), the outer step; streamed
        in fragments (node/protocol/rounds/streaming.py) when comm.fragments or comm.sync_delay say so. Raises
        NonFinite."""
        if self.stream is not None:
            return self.stream.run(r, self.forger)
        w, c = self.worker, self.cfg.comm
        self.compression.begin(r, w.state())
        start = w.round_start()
        result = RoundResult(w.train(r, stop=self.exchange.stopping))
        if self.exchange.stopping():
            return result
        if self.allreduce is not None:
            self._all_reduce(r, start, result)
            return result
        self._step(r, 0, start, result, round(result.stats.samples_per_second, 3))
        if self.exchange.stopping():
            return result
        new, self.momentum = outer_step(start, w.state(), self.momentum, c.outer_lr, c.outer_momentum)
        w.load(new)
        return result

    def _all_reduce(self, r: int, start: dict, result: RoundResult) -> None:
        """Steps 2-4 by the all-reduce: the group's average pseudo-gradient (one group), or average model (several:
        the pull towards the group's parameters is part of the step), then the outer step."""
        w, c = self.worker, self.cfg.comm
        own = w.state()
        published = own if self.forger is None else self.forger.forge(start, own, r, 0)
        keys, sps = float_keys(start), round(result.stats.samples_per_second, 3)
        weight = max(result.stats.samples, 1)
        done, g = self.allreduce.pseudo_gradient(
            self.exchange, r, start, published, keys, weight, samples_per_second=sps
        )
        result.members, result.mixed = len(done.group), done.answered
        if self.forger is not None and not self.forger.mixes:
            return
        moved, self.momentum = nesterov({k: start[k] for k in keys}, g, self.momentum, c.outer_lr, c.outer_momentum)
        w.load({k: moved[k] if k in moved else own[k] for k in own})

    def outer_tensors(self, private: bool = True) -> dict[str, torch.Tensor]:
        """The outer optimizer's state, for checkpoints: momentum/<tensor>; with error feedback over the all-reduce
        and `private`, residual/<fragment> (this node's own, not for a joiner); streamed, the fragments' state
        (node/protocol/rounds/streaming.py: Stream.tensors)."""
        out = {f"momentum/{k}": v for k, v in (self.momentum or {}).items()}
        if self.allreduce is not None and private:
            out |= {f"residual/{f}": v for f, v in self.allreduce.residual.items()}
        return out | (self.stream.tensors() if self.stream is not None else {})

    def load_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what outer_tensors gave (from a checkpoint: checked). Raises ValueError for a name this node does not
        keep or a tensor whose shape or dtype does not fit its model."""
        like = {k: v for k, v in self.worker.state().items() if v.is_floating_point()}
        momentum, residual, rest = {}, {}, {}
        for name, t in tensors.items():
            kind, _, key = name.partition("/")
            if kind == "momentum":
                momentum[key] = fitting(name, t, like.get(key))
            elif kind == "residual" and self.allreduce is not None and key.isdigit():
                residual[int(key)] = fitting(name, t, t if t.dim() == 1 and t.is_floating_point() else None)
            else:
                rest[name] = t
        if rest and self.stream is None:
            raise ValueError(f"checkpoint holds outer state {sorted(rest)[0]!r} this node does not keep")
        if momentum and set(momentum) != set(like):
            raise ValueError("checkpoint's outer momentum does not cover this model's tensors")
        if self.stream is not None:
            self.stream.load(rest, like)
        self.momentum = momentum or None
        if self.allreduce is not None:
            self.allreduce.residual = residual

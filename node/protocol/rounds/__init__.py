"""The round protocols, each written once and run by daemons and the simulator alike.

A protocol is built from a node's `NodeConfig`, its `Worker` (model, data, optimizer) and an
`Exchange` (node/protocol/exchange/): gRPC + DHT in a daemon, the in-memory board in the simulator.
`run(r)` does round r and returns a `RoundResult`; the engine (node/protocol/engine.py) loops over
rounds, rolls back non-finite ones and ends with `node.protocol.rounds.final.finish`.

- `gossip`: decentralized SGD under a gossip schedule (constant = D-PSGD / MGS, late), with
  variance correction and every robust aggregator with the trust tracker;
- `modest`: MoDeST sampling of trainers and aggregators;
- `diloco`: DiLoCo-class rounds: inner steps, then an outer Nesterov step on the pseudo-gradient averaged over
  the round's gossip graph;
- `distill`: logit exchange on a proxy set (EdgeFD, KnFu);
- `ranks`: FRL, edge rankings of a shared random network voted on (node/algo/frl.py);
- `final`: the last round's publication, MoDeST's last aggregate and the final merge.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from node.protocol.timing import TimeSplit
from node.protocol.train import RoundStats
from node.registry import ALGORITHMS, EXCHANGES, check_registered

log = logging.getLogger("atoll.merge")


@dataclass
class RoundResult:
    """What one round did: training statistics, the neighbours mixed with (sorted peer ids),
    the members seen, the updates a robust aggregator discarded (peer -> reason), and where the round's time went
    (`time`: set by the engine, node/protocol/timing.py)."""

    stats: RoundStats
    mixed: list[str] = field(default_factory=list)
    members: int = 0
    discarded: dict[str, str] = field(default_factory=dict)
    distill_loss: float | None = None
    time: TimeSplit = field(default_factory=TimeSplit)


@runtime_checkable
class RoundProtocol(Protocol):
    """One node's rounds: what the engine (node/protocol/engine.py) and the end of training
    (node/protocol/rounds/final.py) call. `Rounds` gives the defaults of the three final hooks."""

    def run(self, r: int) -> RoundResult:
        """Round `r` of this node: train, exchange, mix. Raises NonFinite when the model turns NaN/Inf."""

    def adopt_aggregate(self, last_round: int) -> None:
        """After the last round: take what the protocol aggregated in `last_round` (MoDeST's aggregators); a no-op
        for the others."""

    def merge_state(self) -> dict[str, torch.Tensor]:
        """What the final merge averages: the model's state (FRL: each edge's position in the ranking)."""

    def adopt_merged(self, merged: dict[str, torch.Tensor], members: int) -> dict[str, torch.Tensor] | None:
        """Take the final merge of `members` nodes; returns what to publish as the merged state, or None when it was
        refused (a merge holding NaN/Inf: the node keeps its own)."""


class Rounds:
    """The defaults of RoundProtocol's final hooks, for protocols that average models: `worker` is the node's
    Worker, set by the subclass. `forger` is None for an honest node; an attack rehearsal installs one
    (node/protocol/rehearsal.py: `install`, which asks `forger_for`)."""

    worker: Any
    forger: Any = None

    def forger_for(self, cfg, worker, me: str):
        """The forger of an attacking node of this protocol (`me`: its peer id): model forgeries by default."""
        from node.protocol.rehearsal import Forger

        return Forger(cfg, worker, me)

    def adopt_aggregate(self, last_round: int) -> None:
        """Nothing was aggregated apart from the model."""

    def merge_state(self) -> dict[str, torch.Tensor]:
        """The model's state (what travels)."""
        return self.worker.state()

    def adopt_merged(self, merged: dict[str, torch.Tensor], members: int) -> dict[str, torch.Tensor] | None:
        """Load the merged model, unless it holds NaN/Inf (a member sent NaN/Inf into the all-reduce): then keep
        this node's and return None."""
        before = {k: v.clone() for k, v in self.worker.state().items()}
        self.worker.load(merged)
        if not self.worker.all_finite():
            log.warning("the final merge is not finite; keeping this node's model")
            self.worker.load(before)
            return None
        return self.worker.state()


# (comm.exchange, comm.algorithm) -> the protocol's class, as module:attribute (imported when built)
PROTOCOLS = {
    ("model", "gossip"): "node.protocol.rounds.gossip:GossipRounds",
    ("model", "modest"): "node.protocol.rounds.modest:ModestRounds",
    ("model", "diloco"): "node.protocol.rounds.diloco:DiLoCoRounds",
    ("logits", "gossip"): "node.protocol.rounds.distill:DistillRounds",
    ("ranks", "gossip"): "node.protocol.rounds.ranks:RankRounds",
}
check_registered("round protocol", {e for e, _ in PROTOCOLS} | {a for _, a in PROTOCOLS}, EXCHANGES + ALGORITHMS)


def build(cfg, worker, exchange) -> RoundProtocol:
    """The protocol `cfg.comm` names (exchange, algorithm), ready to `run(r)`. Raises ValueError for a combination
    with no protocol (the config's rules refuse those first)."""
    key = (cfg.comm.exchange, cfg.comm.algorithm)
    if key not in PROTOCOLS:
        known = ", ".join(f"{e}+{a}" for e, a in PROTOCOLS)
        raise ValueError(f"no round protocol for comm.exchange {key[0]} with comm.algorithm {key[1]}; known: {known}")
    module, _, attr = PROTOCOLS[key].partition(":")
    return getattr(importlib.import_module(module), attr)(cfg, worker, exchange)

"""The round protocols, each written once and run by daemons and the simulator alike.

A protocol is built from a node's `NodeConfig`, its `Worker` (model, data, optimizer) and an
`Exchange` (node/protocol/exchange/): gRPC + DHT in a daemon, the in-memory board in the simulator.
`run(r)` does round r and returns a `RoundResult`; the engine (node/protocol/engine.py) loops over
rounds, rolls back non-finite ones and ends with `node.protocol.rounds.final.finish`.

- `gossip`: decentralized SGD under a gossip schedule (constant = D-PSGD / MGS, late), with
  variance correction and every robust aggregator with the trust tracker;
- `modest`: MoDeST sampling of trainers and aggregators;
- `distill`: logit exchange on a proxy set (EdgeFD, KnFu);
- `ranks`: FRL, edge rankings of a shared random network voted on (node/algo/frl.py);
- `final`: the last round's publication, MoDeST's last aggregate and the final merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.protocol.train import RoundStats


@dataclass
class RoundResult:
    """What one round did: training statistics, the neighbours mixed with (sorted peer ids),
    the members seen, and the updates a robust aggregator discarded (peer -> reason)."""

    stats: RoundStats
    mixed: list[str] = field(default_factory=list)
    members: int = 0
    discarded: dict[str, str] = field(default_factory=dict)
    distill_loss: float | None = None


def build(cfg, worker, exchange):
    """The protocol `cfg.comm` names (exchange, algorithm), ready to `run(r)`."""
    if cfg.comm.algorithm == "modest":
        from node.protocol.rounds.modest import ModestRounds

        return ModestRounds(cfg, worker, exchange)
    if cfg.comm.exchange == "ranks":
        from node.protocol.rounds.ranks import RankRounds

        return RankRounds(cfg, worker, exchange)
    if cfg.comm.exchange == "logits":
        from node.protocol.rounds.distill import DistillRounds

        return DistillRounds(cfg, worker, exchange)
    from node.protocol.rounds.gossip import GossipRounds

    return GossipRounds(cfg, worker, exchange)

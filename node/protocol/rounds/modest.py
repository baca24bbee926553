"""MoDeST rounds: per round a deterministic sample of trainers and aggregators
(`node.algo.comm.modest.sample` over the live members, without coordination).

A trainer of round r loads round r-1's aggregate from the first of that round's aggregators
that delivers it, trains, and publishes its model as (model, r, 0). An aggregator fetches
what the round's trainers published, averages it weighted by their data set sizes, and
publishes the aggregate as (model, r, AGGREGATE_STEP). Other nodes only note their progress.
A sampled node that does not answer is skipped, which is why the scheme tolerates most peers
being unresponsive. When aggregators disagree (one missed a trainer), every trainer takes the
first responsive aggregator's copy, in sorted order: the same choice on every node.

Paper: de Vos et al., "MoDeST: Bridging the Gap between Federated and Decentralized Learning with
Decentralized Sampling", 2023.
"""

from __future__ import annotations

from node.algo import aggregate
from node.algo.comm import modest
from node.protocol.exchange import model_like
from node.protocol.rounds import RoundResult, Rounds
from node.protocol.train import RoundStats
from node.protocol.worker import NonFinite
from p2pd.tensors import SnapshotKey


class ModestRounds(Rounds):
    """MoDeST rounds of one node (see the module docstring)."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`: the node's NodeConfig (`comm.modest_trainers` and `comm.modest_aggregators`: nodes sampled per round;
        `train.seed` seeds the sample); `worker`: its Worker; `exchange`: its Exchange."""
        self.cfg, self.worker, self.exchange = cfg, worker, exchange

    def sample(self, r: int) -> tuple[list[str], list[str], dict[str, int]]:
        """(trainers, aggregators, data set size by member) of round r."""
        members = self.exchange.members(r)
        c = self.cfg.comm
        trainers, aggs = modest.sample(
            [m.peer_id for m in members], r, self.cfg.train.seed, c.modest_trainers, c.modest_aggregators
        )
        return trainers, aggs, {m.peer_id: max(1, m.dataset_size) for m in members}

    def run(self, r: int) -> RoundResult:
        """Round r as a trainer, an aggregator, both or neither. Raises NonFinite."""
        me, w, ex = self.exchange.me, self.worker, self.exchange
        trainers, aggs, size = self.sample(r)
        result = RoundResult(RoundStats(0.0, 0, 0, 0.0), members=len(size))
        if me in trainers:
            if r > 0:
                self.adopt_aggregate(r - 1)
            result.stats = w.train(r, stop=ex.stopping)
            if ex.stopping():
                return result
            sps = round(result.stats.samples_per_second, 3)
            ex.publish(SnapshotKey("model", r, 0), w.state(), samples_per_second=sps)
        if me in aggs:
            own = w.state()
            models = ex.fetch_many([t for t in trainers if t != me], SnapshotKey("model", r, 0), model_like(own))
            if me in trainers:
                models[me] = own
            if models:
                names = sorted(models)
                w.load(aggregate.mean([models[j] for j in names], [size.get(j, 1) for j in names]))
            result.mixed = sorted(j for j in models if j != me)
            if not w.all_finite():  # never publish NaN/Inf: the engine rolls the round back
                raise NonFinite("model_after_mixing")
            ex.publish(SnapshotKey("model", r, modest.AGGREGATE_STEP), w.state())
        elif me not in trainers:
            ex.note(r, 0)
        return result

    def adopt_aggregate(self, r: int) -> bool:
        """Load round r's aggregate from the first of its aggregators that delivers it."""
        _, aggs, _ = self.sample(r)
        if self.exchange.me in aggs:
            return True  # made here: this node's model is that aggregate
        own = self.worker.state()
        for a in aggs:
            got = self.exchange.fetch_many([a], SnapshotKey("model", r, modest.AGGREGATE_STEP), model_like(own))
            if a in got:
                self.worker.load(got[a])
                return True
        return False

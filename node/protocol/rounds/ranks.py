"""FRL rounds (`comm.exchange: ranks`, node/algo/frl.py): per round,
1. train the edge scores of the shared random network (its weights never change);
2. publish each layer's ranking as snapshot (ranks, r, 0): int32 permutations, no weights;
3. fetch the rankings of the round's gossip neighbours (`node.algo.comm.topology`), refusing any
   that is not a permutation of the layer (`not_a_permutation`) or does not fit the model
   (`incompatible`);
4. vote: each of this node and its answering neighbours has one vote (summed positions),
   and the node reorders its scores to the voted ranking.

The final merge votes over every live node: the all-reduce averages the nodes' positions
(the mean orders edges like the sum), and every node adopts that ranking.

An attacking node (`security.attack`, a rehearsal) crafts its published ranking with the
same attacks as model exchange, applied to position vectors (node/algo/security/attacks.py):
`reverse` publishes its ranking reversed (the worst single vote), `sign_flip` and `ipm` push
positions against the round's movement, `alie` hides just outside the neighbours' spread,
`label_flip` ranks by flipped labels.

Paper: Mozaffari, Shejwalkar and Houmansadr, "FRL: Federated Rank Learning", 2021.
"""

from __future__ import annotations

import torch

from node.algo import frl
from node.algo.comm.topology import graph
from node.protocol.rounds import RoundResult, Rounds
from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey


class RankRounds(Rounds):
    """FRL rounds of one node (see the module docstring)."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`: the node's NodeConfig; `worker`: its Worker, whose model is an FRL supermask (`comm.exchange: ranks`)
        `exchange`: its Exchange. Records the initial edge positions an attack rehearsal's forger starts from."""
        self.cfg, self.worker, self.exchange = cfg, worker, exchange
        self.names = frl.score_names(worker.model.state_dict())
        self.params = dict(worker.model.named_parameters())
        self.init = self._positions()
        self.forger = None  # RankForger of an attack rehearsal (forger_for)

    def rankings(self) -> dict[str, torch.Tensor]:
        """This node's ranking of every layer (int32 permutations)."""
        return {k: frl.ranking(self.params[k]) for k in self.names}

    def _positions(self) -> torch.Tensor:
        """Every edge's position in this node's rankings, as one float vector."""
        return torch.cat([frl.positions(r).float() for r in self.rankings().values()])

    def forger_for(self, cfg, worker, me: str):
        """An attacking FRL node forges rankings: the attacks applied to its edge positions."""
        from node.protocol.rehearsal import RankForger

        return RankForger(cfg, worker, self.init)

    def _published(self, start: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
        own = self.rankings()
        vec = self.forger.forge(start, self._positions(), r) if self.forger is not None else None
        if vec is None:
            return own
        out, at = {}, 0
        for k, rank in own.items():
            out[k] = frl.ranking(vec[at : at + len(rank)])
            at += len(rank)
        return out

    def run(self, r: int) -> RoundResult:
        """Round r: train the scores, publish the rankings, vote with the neighbours."""
        w, ex, c = self.worker, self.exchange, self.cfg.comm
        start = self._positions()
        result = RoundResult(w.train(r, stop=ex.stopping))
        if ex.stopping():
            return result
        sps = round(result.stats.samples_per_second, 3)
        published = self._published(start, r)
        ex.publish(SnapshotKey("ranks", r, 0), published, samples_per_second=sps)
        members = ex.members(r)
        result.members = len(members)
        g = graph([m.peer_id for m in members] + [ex.me], c.topology, r, self.cfg.train.seed, c.random_degree)
        nbrs = sorted(g[ex.me])
        got = ex.fetch_many(nbrs, SnapshotKey("ranks", r, 0), self._accept())
        if self.forger is not None:
            self.forger.saw([torch.cat([frl.positions(v[k]).float() for k in self.names]) for v in got.values()])
            if not self.forger.mixes:
                return result
        self._adopt({k: frl.vote([published[k], *(v[k] for v in got.values())]) for k in self.names})
        result.mixed = sorted(got)
        return result

    def _adopt(self, voted: dict[str, torch.Tensor]) -> None:
        for k, rank in voted.items():
            frl.reorder(self.params[k], rank)
            # the optimizer's momentum is indexed by the old edges: it would push the wrong ones
            self.worker.optimizer.state.pop(self.params[k], None)

    def _accept(self):
        sizes = {k: self.params[k].numel() for k in self.names}

        def accept(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if set(theirs) != set(sizes) or any(tuple(theirs[k].shape) != (n,) for k, n in sizes.items()):
                raise ReasonedError("incompatible", "rankings that do not fit this model")
            for k, n in sizes.items():
                if not frl.is_permutation(theirs[k], n):
                    raise ReasonedError("not_a_permutation", f"{k}: not a permutation of its {n} edges")
            return theirs

        return accept

    # -- the final merge: hooks node.protocol.rounds.final.finish uses ---------------------------------
    def merge_state(self) -> dict[str, torch.Tensor]:
        """What this node puts into the final all-reduce: each edge's position, float32, shaped
        like the layer's scores (the averager was built with the scores' shapes)."""
        return {k: frl.positions(v).float().view(self.params[k].shape) for k, v in self.rankings().items()}

    def adopt_merged(self, merged: dict[str, torch.Tensor], members: int) -> dict[str, torch.Tensor]:
        """Take the ranking of the averaged positions of `members` nodes (the vote of every live
        node): rounded back to the exact integer sums first, so float rounding in the all-reduce
        cannot break ties differently on different members; returns the merged positions (what is published)."""
        self._adopt({k: frl.ranking(torch.round(merged[k].double() * members)) for k in self.names})
        return merged

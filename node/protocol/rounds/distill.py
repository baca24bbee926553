"""Logit exchange (`comm.exchange: logits`, any mix of architectures): federated distillation
on a shared unlabeled proxy set (node/algo/distill/).

Round r: train locally; publish this node's logits on the proxy rows it speaks for as
(logits, r, 0); fetch the neighbours' (logits, r, 0) (the round's graph over the live
members); fuse them per proxy row (EdgeFD: only the rows each teacher speaks for; KnFu:
similarity weights) and take `distill.steps` distillation steps towards the fused soft
targets. FedD2S (`distill.method: fedd2s`) distils only the layers that have not yet dropped
out (node/algo/distill/fedd2s.py): the deeper ones stay personal. Distilling last keeps what the
neighbours taught: with FedMD's order (digest, then train) the local steps on a node's few
classes erased it again.

Papers: EdgeFD (2025), KnFu (2024), FedD2S (2024): see node/algo/distill/.
"""

from __future__ import annotations

import torch

from node.algo import distill
from node.algo.comm.topology import neighbours
from node.protocol.rounds import RoundResult, Rounds
from p2pd.tensors import SnapshotKey


class DistillRounds(Rounds):
    """Logit-exchange rounds of one node (see the module docstring)."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`: the node's NodeConfig (`comm`, `distill`, `train.seed`, `optim.batch_size`); `worker`: its Worker,
        built for logit exchange (proxy set, `distill_opt`); `exchange`: its Exchange."""
        self.cfg, self.worker, self.exchange = cfg, worker, exchange

    def run(self, r: int) -> RoundResult:
        """Round r: train, publish logits, distill from the neighbours'. Raises NonFinite."""
        w, ex, cfg = self.worker, self.exchange, self.cfg
        result = RoundResult(w.train(r, stop=ex.stopping))
        if ex.stopping():
            return result
        payload = distill.logits_payload(w.model, w.proxy_x, w.proxy_rows)
        sps = round(result.stats.samples_per_second, 3)
        ex.publish(SnapshotKey("logits", r, 0), payload, samples_per_second=sps)
        members = ex.members(r)
        result.members = len(members)
        c = cfg.comm
        nbrs = neighbours([m.peer_id for m in members], ex.me, c.topology, r, cfg.train.seed, c.random_degree)
        n_proxy = len(w.proxy_x)
        teachers = ex.fetch_many(
            nbrs, SnapshotKey("logits", r, 0), lambda t: distill.check_logits(t, n_proxy, w.num_classes)
        )
        if not teachers:
            return result
        d = cfg.distill
        if distill.uses_knfu(d.method):
            w.model.eval()
            with torch.no_grad():
                own = w.model(w.proxy_x)
            weights = distill.knfu_weights(own, {j: t[1] for j, t in teachers.items()}, d.knfu_beta)
        else:
            weights = {j: 1.0 for j in teachers}
        targets, covered = distill.fused_targets(n_proxy, w.num_classes, teachers, weights, d.temperature)
        gen = torch.Generator().manual_seed(cfg.train.seed * 31 + r * 7 + cfg.node_index)
        personal = distill.dropped_layers(w.model, r, d.drop_rate) if distill.drops_layers(d.method) else []
        frozen = [p for m in personal for p in m.parameters(recurse=False) if p.requires_grad]
        for p in frozen:  # no gradient: the momentum-free distillation SGD leaves them as they are
            p.requires_grad_(False)
        try:
            result.distill_loss = distill.distill_steps(
                w.model, w.distill_opt, w.proxy_x, targets, covered, d.steps, cfg.optim.batch_size, d.temperature, gen
            )
        finally:
            for p in frozen:
                p.requires_grad_(True)
        result.mixed = sorted(teachers)
        return result

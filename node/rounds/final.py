"""After the last round R: MoDeST nodes take round R-1's aggregate; every node publishes its
final model as (model, R); with `comm.final_merge` all live nodes then average once, exactly
("A Single Merging Suffices"), and publish the merged model as (model, R + 1); finally a node
keeps serving until every live member got as far, so slower neighbours can still fetch."""

from __future__ import annotations

import logging

from p2pd.tensors import SnapshotKey

log = logging.getLogger("atoll.merge")


def finish(cfg, worker, exchange, protocol) -> int | None:
    """Run the end of training; returns the final merge's group size (1: alone, 0: missed,
    None: no merge configured)."""
    rounds = cfg.train.rounds
    if cfg.comm.algorithm == "modest":
        protocol.adopt_aggregate(rounds - 1)
    exchange.publish(SnapshotKey("model", rounds), worker.state())
    last, merged_with = rounds, None
    if cfg.comm.final_merge:
        last = rounds + 1
        result = exchange.all_reduce(rounds, worker.state(), cfg.comm.merge)
        merged_with = len(result[1]) if result is not None else 0
        if result is not None:
            before = {k: v.clone() for k, v in worker.state().items()}
            worker.load(result[0])
            if not worker.all_finite():  # a member sent NaN/Inf into the all-reduce: keep ours
                log.warning("the final merge is not finite; keeping this node's model")
                worker.load(before)
                merged_with = 0
        exchange.publish(SnapshotKey("model", last), worker.state())
    exchange.linger(last)
    return merged_with

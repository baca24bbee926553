"""After the last round R: MoDeST nodes take round R-1's aggregate; every node publishes its
final model as (model, R); with `comm.final_merge` all live nodes then average once, exactly
("A Single Merging Suffices"), and publish the merged model as (model, R + 1); finally a node
keeps serving until every live member got as far, so slower neighbours can still fetch.
A protocol with `merge_state()` / `adopt_merged(merged)` (FRL's RankRounds) merges what
those give instead of the model (for FRL: edge positions, so the merge is a vote).

Paper: "A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized
Learning", 2025.
"""

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
    # what the merge averages: the model, or (FRL) each edge's position in the node's ranking
    state = getattr(protocol, "merge_state", worker.state)
    exchange.publish(SnapshotKey("model", rounds), state())
    last, merged_with = rounds, None
    if cfg.comm.final_merge:
        last = rounds + 1
        result = exchange.all_reduce(rounds, state(), cfg.comm.merge)
        merged_with = len(result[1]) if result is not None else 0
        if result is not None and hasattr(protocol, "adopt_merged"):
            protocol.adopt_merged(result[0], len(result[1]))
            state = lambda: result[0]  # noqa: E731  (what the canonical member's peers compare with theirs)
        elif result is not None:
            before = {k: v.clone() for k, v in worker.state().items()}
            worker.load(result[0])
            if not worker.all_finite():  # a member sent NaN/Inf into the all-reduce: keep ours
                log.warning("the final merge is not finite; keeping this node's model")
                worker.load(before)
                merged_with = 0
        exchange.publish(SnapshotKey("model", last), state())
    exchange.linger(last)
    return merged_with

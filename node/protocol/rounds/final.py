"""After the last round R: MoDeST nodes take round R-1's aggregate; every node publishes its
final model as (model, R); with `comm.final_merge` all live nodes then average once, exactly
("A Single Merging Suffices"), and publish the merged model as (model, R + 1); finally a node
keeps serving until every live member got as far, so slower neighbours can still fetch.
The protocol's hooks (node/protocol/rounds/__init__.py: RoundProtocol) say what is merged and
how it is taken: the model by default, edge positions for FRL's RankRounds (the merge is a vote).

Paper: "A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized
Learning", 2025.
"""

from __future__ import annotations

from p2pd.tensors import SnapshotKey


def finish(cfg, worker, exchange, protocol) -> int | None:
    """Run the end of training; returns the final merge's group size (1: alone, 0: missed,
    None: no merge configured)."""
    rounds = cfg.train.rounds
    protocol.adopt_aggregate(rounds - 1)  # MoDeST's aggregators take round R-1's aggregate
    # what the merge averages: the model, or (FRL) each edge's position in the node's ranking
    exchange.publish(SnapshotKey("model", rounds), protocol.merge_state())
    last, merged_with = rounds, None
    if cfg.comm.final_merge:
        last = rounds + 1
        result = exchange.all_reduce(rounds, protocol.merge_state(), cfg.comm.merge)
        merged_with = len(result[1]) if result is not None else 0
        published = protocol.adopt_merged(result[0], len(result[1])) if result is not None else None
        if result is not None and published is None:
            merged_with = 0
        # what the canonical member's peers compare with theirs
        exchange.publish(SnapshotKey("model", last), published if published is not None else protocol.merge_state())
    exchange.linger(last)
    return merged_with

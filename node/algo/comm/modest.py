"""MoDeST sampling: per round, a deterministic sample of trainers and aggregators.

Every node computes the same sample from (sorted live peer ids, round, seed) without talking.
Trainers pull the previous round's aggregate from any live aggregator of that round, train,
and publish; aggregators pull what the round's trainers published and average it. Nodes
outside the sample do nothing that round, and a sampled node that does not answer is simply
skipped, which is why the scheme tolerates most peers being unresponsive.

Paper: de Vos et al., "MoDeST: Bridging the Gap between Federated and Decentralized Learning with
Decentralized Sampling", 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

from node.algo.comm import seeded_rng

AGGREGATE_STEP = 1  # snapshot (model, r, 1) is round r's aggregate; (model, r, 0) a trainer's model


def sample(
    peers: Sequence[str], round_: int, seed: int, trainers: int, aggregators: int
) -> tuple[list[str], list[str]]:
    """(trainers, aggregators) of a round; both sorted, possibly overlapping."""
    ids = sorted(set(peers))
    if round_ < 0 or not ids:
        return [], []
    rng = seeded_rng("modest", seed, round_)
    return sorted(rng.sample(ids, min(trainers, len(ids)))), sorted(rng.sample(ids, min(aggregators, len(ids))))

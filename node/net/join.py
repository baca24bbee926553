"""Elastic join: a node that starts (or finds itself) far behind a running swarm downloads where the swarm is instead
of training alone until its round counter catches up.

Every daemon publishes, after each round r, its join state as snapshot (join, r, JOIN_STEP): the tensors it
publishes (the model, or a task's shared tensors) plus the round protocol's shared state (DiLoCo's outer momentum,
a streamed swarm's fragments: node/protocol/worker.py OuterState). A kind of its own, of which a node keeps only the
newest, so it takes nothing from the snapshots kept for slower neighbours and one entry of the signed record; the
step is the largest a key can take, so the record's (round, step) never goes back. Encoding it costs a digest and a
copy a round; it travels only when a joiner asks.

A node compares its round with the live members' (the median of their signed records, so one liar cannot send it
to the end of training): when the swarm is more than LAG rounds ahead, at start or after any round (a node frozen
for a while), it fetches the newest join state from up to DONORS members that sign one, checked against the digest
the donor signed (node/net/fetcher.py), loads it and goes on from the round after it. Until then its record shows
its old round, so the running members leave it out of their rounds (node/net/view.py: members far behind are not
waited for) and nobody's round waits for it. CHOCO-SGD estimates need nothing: a node that did not start at round 0
starts a lineage of its own and its neighbours fetch its estimate (node/protocol/compression.py). Every protocol
takes a late joiner this way, MoDeST (which samples from the live members each round) and FRL (the join state is
the edge scores) included; a node whose download fails keeps its own state and says so.

Papers: the same idea as hivemind's load_state_from_peers and torchft's live recovery, without a coordinator.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from node.protocol.exchange import model_like
from node.protocol.worker import OUTER
from p2pd.errors import ReasonedError
from p2pd.tensors import SnapshotKey

log = logging.getLogger("atoll.join")
JOIN_STEP = 2**32 - 1  # the step of a round's join state: after every other snapshot of the round
LAG = 2  # rounds behind the swarm's median before a node downloads instead of training alone
DONORS = 3  # members tried, newest join state first
_warned: set[int] = set()  # rounds after one whose catch-up failed: said once at WARNING, then at INFO


def publish_join_state(exchange, worker, round_: int) -> None:
    """Serve round `round_`'s join state (see the module docstring) through `exchange` (a GrpcExchange)."""
    shared = {OUTER + k: v.detach().clone() for k, v in worker.outer.tensors(private=False).items()}
    exchange.publish(SnapshotKey("join", round_, JOIN_STEP), {**_copy(worker.state()), **shared})


def swarm_round(exchange) -> int | None:
    """The median round of the live members this node exchanges with (itself left out), None when alone."""
    me = exchange.me
    rounds = [p.round for p in exchange.view.candidates() if p.peer_id != me]
    return int(statistics.median_low(rounds)) if rounds else None


def catch_up(exchange, worker, next_round: int, say=lambda event: None) -> int | None:
    """If the swarm is more than LAG rounds past `next_round` (the round this node would do next): download a
    member's newest join state into `worker` and return the round to go on from; None when not behind or when no
    download succeeded (this node then goes on with its own state, and says so). `say(event)` hears a "caught_up"
    event."""
    at = swarm_round(exchange)
    if at is None or at <= next_round + LAG:
        return None
    # donors: members near the median, nearest first (one far from it is not trusted to say where the swarm is);
    # each is asked which join states it serves now, and its newest within LAG of the median is fetched
    near = sorted(
        (abs(p.round - at), p.peer_id)
        for p in exchange.view.candidates()
        if p.peer_id != exchange.me and abs(p.round - at) <= LAG
    )
    own = worker.state()
    exchange.view.members()  # the donors' addresses, fresh
    for _, donor in near[:DONORS]:
        served = [
            k.round
            for k in exchange.fetcher.served(donor)
            if k.kind == "join" and k.step == JOIN_STEP and next_round <= k.round <= at + LAG
        ]
        if not served:
            continue
        r, t0 = max(served), time.monotonic()
        got = exchange.fetcher.fetch(
            donor, SnapshotKey("join", r, JOIN_STEP), _join_like(own), time.monotonic() + exchange.comm.fetch_timeout
        )
        if got is None:
            continue
        model = {k: v for k, v in got.items() if not k.startswith(OUTER)}
        try:  # the outer state first: it is what may not fit (the model's names, shapes and dtypes were checked)
            worker.outer.restore({k[len(OUTER) :]: v for k, v in got.items() if k.startswith(OUTER)})
            worker.load({k: v.to(device=own[k].device) for k, v in model.items()})
        except (ValueError, KeyError, RuntimeError) as e:
            log.warning("join state of %s does not fit this node (%s); trying another member", donor[:16], e)
            continue
        worker.keep_good_state()
        exchange.note(r, JOIN_STEP)  # members stop leaving this node out
        seconds = round(time.monotonic() - t0, 3)
        log.info("caught up: round %d of %s (%.1f s); the swarm is at round %d", r, donor[:16], seconds, at)
        say(dict(event="caught_up", round=r + 1, was=next_round, donor=donor, swarm_round=at, seconds=seconds))
        return r + 1
    (log.info if next_round in _warned else log.warning)(
        "the swarm is at round %d, this node at %d, and no member's join state could be downloaded: training on from "
        "round %d with this node's own state (tried again after every round)",
        at,
        next_round,
        next_round,
    )
    _warned.add(next_round + 1)
    return None


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _join_like(own: dict[str, torch.Tensor]):
    """Accept a join state whose model tensors fit `own` (names, shapes, dtypes; model_like) and whose other tensors
    are floating or integer tensors named OUTER + name (checked by the protocol as it loads them)."""
    fits = model_like(own)

    def accept(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = {k: v for k, v in theirs.items() if not k.startswith(OUTER)}
        fits(model)
        if any(not torch.isfinite(v).all() for v in theirs.values() if v.is_floating_point()):
            raise ReasonedError("non_finite", "join state holds NaN/Inf")
        return theirs

    return accept

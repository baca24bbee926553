"""One node's training: the round protocol its config names (node/protocol/rounds/), over an exchange
(node/protocol/exchange/), round after round, then the end of training. A daemon runs one engine; the
simulator runs one per virtual node, each in a thread, over the in-memory exchange.

A round whose loss or model becomes non-finite (NaN/Inf) is rolled back to the last good
state and done again; nothing non-finite is published (the worker checks after training, the
protocols after every mix they publish, receivers refuse non-finite snapshots) and after
MAX_ROLLBACKS in a row the engine raises `Diverged`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from node.protocol import rounds
from node.protocol.rounds import RoundResult
from node.protocol.rounds.final import finish
from node.protocol.timing import TimeSplit
from node.protocol.worker import MAX_ROLLBACKS, NonFinite

log = logging.getLogger("atoll.engine")


class Engine:
    """`cfg`: the node's NodeConfig; `worker`: its node.protocol.worker.Worker; `exchange`: a
    node.protocol.exchange.Exchange. `protocol` is the round protocol, where attack rehearsals install
    their forger (node/protocol/rehearsal.py); `time` is where this node's time went (node/protocol/timing.py),
    and each round's RoundResult carries its own split (`time`)."""

    def __init__(self, cfg, worker, exchange):
        """`cfg`, `worker`, `exchange`: the node's config, Worker and Exchange; builds the round protocol `cfg.comm`
        names. Raises ValueError, from the gossip rounds, for a comm.schedule or codec setting out of range."""
        self.cfg, self.worker, self.exchange = cfg, worker, exchange
        self.protocol = rounds.build(cfg, worker, exchange)
        self.time = TimeSplit()

    def run(
        self,
        start: int,
        after_round: Callable[[int, RoundResult], int | None] = lambda r, res: None,
        on_rollback: Callable[[int, str], None] = lambda r, where: None,
    ) -> int:
        """Rounds `start` .. `train.rounds` - 1, or until the exchange says stop; calls
        `after_round(next_round, result)` after each, which may return a later round to go on from (a node that
        caught up with its swarm, node/net/join.py). Returns the next round to do (R when all are done). Raises
        Diverged."""
        w, r = self.worker, start
        w.keep_good_state()
        ended = None  # when the last round ended: what follows until the next one starts is idle
        while r < self.cfg.train.rounds and not self.exchange.stopping():
            if ended is not None:
                self.time.add_idle(time.perf_counter() - ended)
            try:
                result = self.step(r)
            except NonFinite as e:
                on_rollback(r, e.where)
                w.roll_back(r, e.where)
                log.warning(
                    "round %d: %s became non-finite (NaN/Inf); rolled back to the last good state and "
                    "redoing the round (%d of %d)",
                    r,
                    e.where.replace("_", " "),
                    w.rollbacks_in_a_row,
                    MAX_ROLLBACKS,
                )
                ended = time.perf_counter()
                continue
            ended = time.perf_counter()
            if self.exchange.stopping():
                break  # the round was cut short: it is redone after a restart
            r += 1
            w.keep_good_state()
            jump = after_round(r, result)
            if jump is not None and jump > r:
                r = min(jump, self.cfg.train.rounds)
                w.keep_good_state()
        if ended is not None:
            self.time.add_idle(time.perf_counter() - ended)
        return r

    def step(self, r: int) -> RoundResult:
        """Round r of the protocol, checked: raises NonFinite when the model is not finite
        after it (nothing non-finite was published)."""
        t0 = time.perf_counter()
        try:
            result = self.protocol.run(r)
        except NonFinite:
            self.time.add_round(time.perf_counter() - t0, 0.0)  # the round's time, spent for nothing
            raise
        result.time = self.time.add_round(time.perf_counter() - t0, result.stats.seconds)
        if not self.worker.all_finite():
            raise NonFinite("model_after_mixing")
        return result

    def finish(self) -> int | None:
        """The end of training (node.protocol.rounds.final.finish): the final merge's group size, or None."""
        t0 = time.perf_counter()
        try:
            return finish(self.cfg, self.worker, self.exchange, self.protocol)
        finally:  # the last publication and the final merge: communication
            self.time.comm += time.perf_counter() - t0

"""A training daemon: the wiring of one node. It joins the swarm (identity, DHT, gRPC server,
metrics), runs the round engine (node/protocol/engine.py) over the gRPC exchange, checkpoints every
`checkpoint_rounds` rounds (in the background) and at a stop, leaves cleanly on SIGTERM and
resumes from its checkpoint after a crash.

What a round does is the protocol's (node/protocol/rounds/), written once for daemons and simulator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig
from node.net import checkpoint, join, netcheck
from node.net.metrics import NodeMetrics
from node.net.peer import Peer
from node.net.threads import set_threads
from node.protocol import rehearsal
from node.protocol.rounds import RoundResult
from node.protocol.timing import TimeSplit
from node.protocol.worker import Worker, pick_device
from p2pd.discovery import DiscoveryError
from p2pd.identity import Identity
from p2pd.tensors import pack

log = logging.getLogger("atoll.node")


class Node:
    """One trainer node from its config; `run()` trains to the end (or a stop request) and
    returns the summary event. `on_event` receives ready / waiting / round / done events."""

    def __init__(self, cfg: NodeConfig, on_event: Callable[[dict], None] = lambda e: None):
        """`cfg`: the node's NodeConfig; `on_event(event)`: called with each event dict (ignored by default). Nothing
        starts or joins before `run`."""
        self.cfg, self.on_event = cfg, on_event
        self.stop_requested = threading.Event()
        self.metrics = NodeMetrics()
        self.exchange = self.writer = None
        self.merged_with: int | None = None  # final merge: group size, 0 = missed, None = not run

    def request_stop(self) -> None:
        """Ask the node to stop after the current training step (a checkpoint follows)."""
        self.stop_requested.set()

    def run(self) -> dict:
        """Join, wait for the swarm, train to the end (or a stop), finish; returns the done or
        stopped event. Raises DiscoveryError, IdentityError, CheckpointError, KeyInUse, Diverged,
        OSError (ports in use)."""
        try:
            self._setup()
            self.peer.wait(say=self.on_event)
            self.accuracy, self.loss = None, 0.0
            start = join.catch_up(self.exchange, self.worker, self.start_round, self.on_event)  # a late start
            try:
                r = self.engine.run(start or self.start_round, self._after_round, self._rolled_back)
            except DiscoveryError:
                if not self.stop_requested.is_set():
                    raise
                # a stop signal sent to every process (systemd's default) also ended the DHT
                log.info("the DHT is gone while stopping; checkpointing")
                r = self.done_rounds
            finished = r >= self.cfg.train.rounds
            if finished:
                self.merged_with = self.engine.finish()
                self.accuracy = self.worker.evaluate()
            if not finished or self.merged_with is not None:  # the merged model, or where it stopped
                self._checkpoint(r, None if finished else self.accuracy)
            self.writer.flush()
            summary = dict(
                event="done" if finished else "stopped",
                round=r,
                **self._score(self.accuracy),
                model_digest=pack(self.worker.state()).hexdigest,
                merged_with=self.merged_with,
                peer_id=self.identity.peer_id,
                sent_bytes=self.exchange.sent_bytes,
                received_bytes=self.exchange.received_bytes,
                **self._paths(),
                dataset_size=self.worker.dataset_size,
                metrics={k: round(v, 6) for k, v in self.worker.metrics.items()},  # every metric of the task
                **self.engine.time.as_event(),
            )
            self.on_event(summary)
            return summary
        finally:
            self._teardown()

    def _setup(self) -> None:
        cfg, net = self.cfg, self.cfg.net
        self.threads = set_threads(cfg.threads)
        self.identity = Identity.load_or_create(net.identity_path)
        # the task's hooks run here: a broken task fails before the node joins
        self.worker = Worker(cfg, pick_device(cfg.device))
        self.ckpt_dir = Path(cfg.checkpoint_dir).expanduser()
        self.writer = checkpoint.Checkpointer(
            self.ckpt_dir, cfg.checkpoint_keep, cfg.checkpoint_give_up_rounds, self.metrics
        )
        self.start_round = self.done_rounds = 0

        def joinable(runtime) -> None:  # the DHT is up: others can bootstrap through this node
            self.on_event(
                dict(event="joinable", peer_id=self.identity.peer_id, maddrs=runtime.discovery.visible_maddrs())
            )
            resumed = checkpoint.resume(self.ckpt_dir, self.worker, self.identity.peer_id)
            if resumed:
                self.start_round = self.done_rounds = resumed[0]
                self.metrics.checkpoint_time = resumed[1]
                log.info("resumed from checkpoint at round %d", self.start_round)

        self.peer = Peer.join(cfg, self.worker, self.identity, self.metrics, self.stop_requested, joinable)
        self.exchange, self.engine = self.peer.exchange, self.peer.engine
        self.discovery, self.server, self.tls = self.exchange.discovery, self.exchange.server, self.exchange.tls
        self.advertised = self.exchange.runtime.advertised
        rehearsal.install(self.engine, self.identity.peer_id)
        servicer, tracker = self.server.servicer, self.worker.defence.tracker
        self.metrics.watch(
            lambda: self.exchange.sent_bytes, lambda: dict(self.discovery.refused), lambda: dict(servicer.refused)
        )
        self.metrics.watch_trust(lambda: (dict(tracker.signals), tracker.sybil_clusters()), cfg.security.metrics_top_n)
        self.metrics_port = self.metrics.serve(net.host, cfg.metrics_port) if cfg.metrics_port is not None else None
        self.peer.announce(self.start_round, self.metrics_port or 0)
        self.on_event(
            dict(
                event="ready",
                peer_id=self.identity.peer_id,
                grpc=self.server.address,
                maddrs=self.discovery.visible_maddrs(),
                metrics_port=self.metrics_port,
                start_round=self.start_round,
                dataset_size=self.worker.dataset_size,
                metric=self.worker.metric,
                higher_is_better=self.worker.task.task.higher_is_better,
                device=str(self.worker.device),
                threads=self.threads,
                dht_pid=self.discovery.pid,
            )
        )
        self._round_t0 = time.perf_counter()
        self._counted = TimeSplit()  # what the time counters have been given so far

    def _after_round(self, r: int, res: RoundResult) -> int | None:
        """Round r-1 is done: check the key, evaluate, checkpoint, tell, serve the join state; a round to jump to."""
        netcheck.check_key_in_use(self.discovery, self.advertised, self.tls, self.cfg.net.identity_path, running=True)
        self.done_rounds = r
        self.loss = res.stats.loss if res.stats.steps else self.loss
        self.accuracy = self.worker.evaluate()
        if r % self.cfg.checkpoint_rounds == 0 or r == self.cfg.train.rounds:
            self._checkpoint(r, self.accuracy)
        m, seconds = self.metrics, time.perf_counter() - self._round_t0
        self._round_t0 = time.perf_counter()
        m.round_seconds.observe(seconds)
        m.round.set(r)
        m.loss.set(self.loss)
        m.accuracy.set(self.accuracy)
        m.samples_per_second.set(res.stats.samples_per_second)
        spent = self.engine.time
        m.compute_seconds.inc(spent.compute - self._counted.compute)
        m.comm_seconds.inc(spent.comm - self._counted.comm)
        m.idle_seconds.inc(spent.idle - self._counted.idle)
        self._counted = TimeSplit(spent.compute, spent.comm, spent.idle)
        m.utilization.set(spent.utilization)
        self.discovery.update(utilization=round(spent.utilization, 4))  # for `atoll status`
        m.neighbours_mixed.set(len(res.mixed))
        for reason in res.discarded.values():
            m.updates_discarded.labels(reason=reason).inc()
        if res.distill_loss is not None:
            m.distill_loss.set(res.distill_loss)
        self.on_event(
            dict(
                event="round",
                round=r,
                rounds=self.cfg.train.rounds,
                loss=round(self.loss, 5),
                **self._score(round(self.accuracy, 5)),
                mixed=len(res.mixed),
                peers=self.exchange.live,
                sent_bytes=self.exchange.sent_bytes,
                received_bytes=self.exchange.received_bytes,
                **self._paths(),
                seconds=round(seconds, 3),
                model_digest=pack(self.worker.state()).hexdigest,
                round_time=res.time.as_event(),  # this round: compute and comm (its idle is counted before the next)
                **spent.as_event(),  # since the first round
            )
        )
        join.publish_join_state(self.exchange, self.worker, r - 1)
        return join.catch_up(self.exchange, self.worker, r, self.on_event)  # far behind after a stall

    def _paths(self) -> dict:
        """For an event: this node's reachability as published, the neighbours' snapshots it
        fetched by path (direct, relay, pushed), and what it carries or pushed (outbound-only)."""
        x = self.exchange
        return dict(
            reachability=x.reachability,
            paths=dict(x.paths),
            pushed_bytes=x.pushed_bytes,
            carried_for=self.server.servicer.carried.producers() if self.server.servicer.carried else [],
        )

    def _score(self, value: float | None) -> dict:
        """The task's metric for an event: `metric` (its name) and `score`, and `accuracy` as
        well when that is the metric (what tools read for the built-in tasks)."""
        metric = self.worker.metric
        return dict(metric=metric, score=value, **({"accuracy": value} if metric == "accuracy" else {}))

    def _rolled_back(self, r: int, where: str) -> None:
        self.metrics.rollbacks.labels(reason=where).inc()

    def _checkpoint(self, next_round: int, accuracy: float | None) -> None:
        """Checkpoint in the background (node/net/checkpoint.py's Checkpointer: a failed write is one line and retried
        at the next checkpoint; after `checkpoint_give_up_rounds` rounds with none written, CheckpointError)."""
        if not self.worker.all_finite():  # never over a good checkpoint (the engine rolls back first)
            log.warning("not checkpointing round %d: the model is not finite", next_round)
            return
        self.writer.submit(
            lambda: checkpoint.capture(self.worker, self.identity.peer_id, next_round, accuracy), next_round
        )

    def _teardown(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except (OSError, checkpoint.CheckpointError) as e:  # the run's own error, if any, is the one raised
            log.error("the last checkpoint could not be written: %s", e)
        if self.exchange is not None:
            self.exchange.close()
        self.metrics.close()

"""Prometheus metrics of one node: one registry, one exporter.

Names follow Prometheus conventions (atoll_ prefix, base units, _total counters). Labels are
low-cardinality: `reason` takes values from a fixed set of refusal reasons, and the per-peer
trust series (`peer` = the neighbour's full peer id, so it matches `atoll status` and the DHT)
are exported only for the `top_n` least trusted neighbours in view: at most top_n series per
metric per node, whatever the swarm's size, and always the ones an operator needs to see.
Swarm-wide counts (flagged peers, sybil-cluster size) cover every neighbour.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from p2pd.addresses import bare_host, host_port

PATHS = ("direct", "relay", "pushed")  # how a neighbour's snapshot reached this node (node/net/grpc_exchange.py)


class Exporter:
    """One registry of metrics and its /metrics HTTP endpoint: what every role's metrics (a trainer's NodeMetrics,
    node/net/experts/metrics.py's router and expert) build on."""

    def __init__(self) -> None:
        """A fresh registry; nothing is served before `serve`."""
        self.registry = CollectorRegistry()
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on `host` (IPv4, IPv6 with or without brackets, or a
        name); returns the bound port. Raises OSError naming the port and the setting."""
        try:
            self._server, _ = start_http_server(port, addr=bare_host(host), registry=self.registry)
        except OSError as e:
            raise OSError(
                f"cannot serve metrics on {host_port(host, port)}: {e.strerror or e} "
                f"(metrics_port / --metrics-port; 0 picks a free port)"
            ) from None
        return self._server.server_port

    def close(self) -> None:
        """Stop the /metrics endpoint if it is running."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def by_reason(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family `name` with one series per reason of `counts` (reason -> count), sorted by reason."""
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], float(n))
    return family


class NodeMetrics(Exporter):
    """The Prometheus metrics of one node in their own registry (rounds, training, fetches, refusals, trust,
    checkpoints, the process), exported over HTTP by `serve`."""

    def __init__(self) -> None:
        """Registers every metric in a fresh registry (the path, reachability and checkpoint-failure series at 0 from
        the start, atoll_reachable at -1: not checked); nothing is served before `serve`."""
        super().__init__()
        r = self.registry
        self.round = Gauge("atoll_round", "Last completed training round", registry=r)
        self.loss = Gauge("atoll_train_loss", "Mean local training loss in the last round", registry=r)
        self.accuracy = Gauge(
            "atoll_test_accuracy_ratio", "Accuracy of this node's model on the held-out test split", registry=r
        )
        self.samples_per_second = Gauge("atoll_samples_per_second", "Measured local training throughput", registry=r)
        self.peers_live = Gauge(
            "atoll_peers_live", "Live peers in the swarm as seen through the DHT, self included", registry=r
        )
        # path: direct (gRPC), relay (libp2p streams), pushed (from an outbound-only peer's carrier)
        self.received = Counter(
            "atoll_received_bytes", "Snapshot payload bytes received from neighbours, by path", ["path"], registry=r
        )
        self.fetch_seconds = Histogram(
            "atoll_fetch_duration_seconds",
            "Time to fetch and validate one neighbour snapshot, by path",
            ["path"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        for path in PATHS:  # every series exists from the start (at 0), so dashboards and rate() see it
            self.received.labels(path=path)
            self.fetch_seconds.labels(path=path)
        self.pushed = Counter(
            "atoll_pushed_bytes",
            "Wire bytes of this node's snapshots pushed to its carrier (outbound-only)",
            registry=r,
        )
        self.reachability = Gauge(
            "atoll_reachability",
            "1 for the reachability this node publishes: direct, relayed or outbound_only",
            ["state"],
            registry=r,
        )
        for state in ("direct", "relayed", "outbound_only"):
            self.reachability.labels(state=state).set(0)
        self.fetch_failures = Counter(
            "atoll_fetch_failures", "Neighbour fetches that failed, by reason", ["reason"], registry=r
        )
        self.reachable = Gauge(
            "atoll_reachable",
            "1: a peer dialled this node back at its advertised address; "
            "0: the peers asked could not; -1: not checked (yet)",
            registry=r,
        )
        self.reachable.set(-1)
        self.peers_backed_off = Gauge(
            "atoll_peers_backed_off", "Neighbours skipped as unreachable (exponential back-off in rounds)", registry=r
        )
        self.neighbours_mixed = Gauge(
            "atoll_neighbours_mixed", "Neighbours whose model was mixed in the last round", registry=r
        )
        self.distill_loss = Gauge(
            "atoll_distill_loss",
            "Mean distillation loss on the proxy set in the last round (logit exchange only)",
            registry=r,
        )
        self.merge_peers = Gauge(
            "atoll_final_merge_peers", "Group size of the final all-reduce merge (0: this node missed it)", registry=r
        )
        self.rollbacks = Counter(
            "atoll_rollbacks",
            "Rounds undone because the model or loss became non-finite, by where it was seen",
            ["reason"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "atoll_round_duration_seconds",
            "Wall time of one round: training, exchange, mixing, evaluation",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        # where the node's time goes (node/protocol/timing.py); utilization = compute / (compute + comm + idle)
        self.compute_seconds = Counter("atoll_compute_seconds", "Seconds of local training steps", registry=r)
        self.comm_seconds = Counter(
            "atoll_comm_seconds",
            "Seconds of rounds spent not computing: publishing, waiting for and fetching snapshots, mixing",
            registry=r,
        )
        self.idle_seconds = Counter(
            "atoll_idle_seconds", "Seconds between rounds: evaluation, checkpoint hand-off, events", registry=r
        )
        self.utilization = Gauge(
            "atoll_compute_utilization", "Local computation over wall time since the first round, 0 to 1", registry=r
        )
        # the node's own registry would otherwise export no process metrics (memory, CPU, files)
        ProcessCollector(registry=r)
        self.updates_discarded = Counter(
            "atoll_updates_discarded",
            "Neighbour models the robust aggregator set aside or clipped, by reason",
            ["reason"],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "atoll_checkpoint_failures",
            "Checkpoint writes that failed, by cause (ENOSPC, EIO, EACCES, ...; the previous checkpoint is kept)",
            ["reason"],
            registry=r,
        )
        for reason in ("ENOSPC", "EIO", "EACCES", "EROFS", "other"):  # series from the start: increase() sees the 1st
            self.checkpoint_failures.labels(reason=reason)
        self.checkpoint_time = 0.0
        Gauge(
            "atoll_checkpoint_age_seconds", "Seconds since the last checkpoint was written (-1: none yet)", registry=r
        ).set_function(lambda: time.time() - self.checkpoint_time if self.checkpoint_time else -1.0)

    def watch(
        self,
        sent_bytes: Callable[[], float],
        refused: Callable[[], dict[str, int]],
        requests_refused: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """Export counters kept by the network layer (it holds no prometheus objects itself)."""
        self.registry.register(_Callback(sent_bytes, refused, requests_refused))

    def watch_trust(self, view: Callable[[], tuple], top_n: int) -> None:
        """Export per-neighbour trust from `view()` = (signals by peer id, sybil clusters)."""
        self.registry.register(_TrustCallback(view, top_n))


class _Callback:
    def __init__(self, sent_bytes, refused, requests_refused):
        self.sent_bytes, self.refused, self.requests_refused = sent_bytes, refused, requests_refused

    def collect(self):
        sent = CounterMetricFamily("atoll_sent_bytes", "Snapshot bytes served to neighbours")
        sent.add_metric([], float(self.sent_bytes()))
        yield sent
        yield by_reason("atoll_records_refused", "Peer records dropped, by reason", self.refused())
        yield by_reason(
            "atoll_requests_refused",
            "Fetch requests this node refused to serve, by reason (unsigned, stale, unknown identity, rate limit)",
            self.requests_refused(),
        )


class _TrustCallback:
    _PER_PEER = (
        (
            "atoll_peer_trust_ratio",
            "Trust score of a neighbour in [0, 1] (exponential average of its round scores)",
            "trust",
        ),
        ("atoll_peer_update_norm_ratio", "Size of a neighbour's update over the median update size", "norm_ratio"),
        (
            "atoll_peer_consensus_cosine",
            "Cosine of a neighbour's update with the coordinate-wise median update",
            "cos_consensus",
        ),
        (
            "atoll_peer_history_cosine",
            "Largest cosine of a neighbour's update history with another peer's",
            "cos_history",
        ),
    )

    def __init__(self, view, top_n):
        self.view, self.top_n = view, top_n

    def collect(self):
        signals, clusters = self.view()
        shown = sorted(signals, key=lambda j: (signals[j].trust, j))[: self.top_n]
        for name, doc, attr in self._PER_PEER:
            g = GaugeMetricFamily(name, doc, labels=["peer"])
            for j in shown:
                g.add_metric([j], float(getattr(signals[j], attr)))
            yield g
        # one series per neighbour whatever its state (a label that changed with the verdict
        # made a new series each time); why it is flagged is a gauge of its own
        flagged = GaugeMetricFamily(
            "atoll_peer_flagged", "1 if a neighbour is flagged (low trust or suspected sybil)", labels=["peer"]
        )
        sybil = GaugeMetricFamily(
            "atoll_peer_sybil_suspected",
            "1 if a neighbour's update history is near-identical to another's (a suspected sybil)",
            labels=["peer"],
        )
        for j in shown:
            flagged.add_metric([j], 1.0 if signals[j].flagged else 0.0)
            sybil.add_metric([j], 1.0 if signals[j].sybil else 0.0)
        yield flagged
        yield sybil
        count = GaugeMetricFamily("atoll_peers_flagged", "Neighbours in view that are flagged")
        count.add_metric([], float(sum(s.flagged for s in signals.values())))
        yield count
        size = GaugeMetricFamily(
            "atoll_sybil_cluster_size", "Peers in the largest group of near-identical update histories (0: none)"
        )
        size.add_metric([], float(max((len(c) for c in clusters), default=0)))
        yield size

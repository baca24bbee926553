"""Prometheus metrics of one node: one registry, one exporter.

Names follow Prometheus conventions (atoll_ prefix, base units, _total counters). Labels are
low-cardinality: `reason` takes values from a fixed set of refusal reasons.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.round = Gauge("atoll_round", "Last completed training round", registry=r)
        self.loss = Gauge("atoll_train_loss", "Mean local training loss in the last round", registry=r)
        self.accuracy = Gauge("atoll_test_accuracy_ratio", "Accuracy of this node's model on the held-out test split", registry=r)
        self.samples_per_second = Gauge("atoll_samples_per_second", "Measured local training throughput", registry=r)
        self.peers_live = Gauge("atoll_peers_live", "Live peers in the swarm as seen through the DHT, self included", registry=r)
        self.received = Counter("atoll_received_bytes", "Snapshot payload bytes received from neighbours", registry=r)
        self.fetch_seconds = Histogram(
            "atoll_fetch_duration_seconds", "Time to fetch and validate one neighbour snapshot",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.fetch_failures = Counter("atoll_fetch_failures", "Neighbour fetches that failed, by reason", ["reason"], registry=r)
        self.neighbours_mixed = Gauge("atoll_neighbours_mixed", "Neighbours whose model was mixed in the last round", registry=r)
        self.distill_loss = Gauge("atoll_distill_loss", "Mean distillation loss on the proxy set in the last round "
                                  "(logit exchange only)", registry=r)
        self.merge_peers = Gauge("atoll_final_merge_peers",
                                 "Group size of the final all-reduce merge (0: this node missed it)", registry=r)
        self.checkpoint_time = 0.0
        Gauge("atoll_checkpoint_age_seconds", "Seconds since the last checkpoint was written (-1: none yet)",
              registry=r).set_function(lambda: time.time() - self.checkpoint_time if self.checkpoint_time else -1.0)
        self._server = None

    def watch(self, sent_bytes: Callable[[], float], refused: Callable[[], dict[str, int]]) -> None:
        """Export counters kept by the network layer (it holds no prometheus objects itself)."""
        self.registry.register(_Callback(sent_bytes, refused))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Callback:
    def __init__(self, sent_bytes, refused):
        self.sent_bytes, self.refused = sent_bytes, refused

    def collect(self):
        sent = CounterMetricFamily("atoll_sent_bytes", "Snapshot bytes served to neighbours")
        sent.add_metric([], float(self.sent_bytes()))
        yield sent
        refused = CounterMetricFamily("atoll_records_refused", "Peer records dropped, by reason", labels=["reason"])
        for reason, n in sorted(self.refused().items()):
            refused.add_metric([reason], float(n))
        yield refused

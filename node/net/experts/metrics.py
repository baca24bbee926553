"""Prometheus metrics of the diffusion roles, one registry per process, served like a trainer's
(`metrics_port`, announced in the node's record, so `atoll prometheus-sd` finds them).

Router: requests by route (`grpc_sample`, `http_samples`, `http_experts`, `http_healthz`,
`http_page`, `http_openapi`) and status (a gRPC code name or an HTTP status), latency histograms
by route, images generated (samples per second is its rate()), answers that lacked experts,
live experts and K. Expert: Predict calls by status, their latency, rows answered, training
step and loss. Labels take values from fixed sets only.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from node.net.experts.sampling import Answer
from node.net.metrics import Exporter, by_reason

ROUTES = ("grpc_sample", "http_samples", "http_experts", "http_healthz", "http_page", "http_openapi")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics(Exporter):
    """The router's series (see the module docstring); `observe` is what the gRPC and HTTP front ends call."""

    def __init__(self, clusters: int, live: Callable[[], int], refused: Callable[[], dict[str, int]] = dict):
        """`clusters`: K; `live()`: experts live now (read at each scrape, so keep it cheap: a cached count);
        `refused()`: gRPC Sample refusals by reason (rate, busy, bad_request)."""
        super().__init__()
        r = self.registry
        self.requests = Counter(
            "atoll_router_requests", "Requests to the router, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "atoll_router_request_duration_seconds",
            "Time from a request's arrival to its answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for route in ROUTES:  # every route's histogram exists from the start, so dashboards see it
            self.latency.labels(route=route)
        self.samples = Counter("atoll_router_samples", "Images generated and sent to clients", registry=r)
        self.incomplete = Counter(
            "atoll_router_incomplete_answers",
            "Sample answers made with fewer experts than the strategy asked for (experts missing or dropped)",
            registry=r,
        )
        Gauge("atoll_router_experts_clusters", "K: experts the clustering has", registry=r).set(clusters)
        Gauge("atoll_router_experts_live", "Experts live in the DHT at the last look", registry=r).set_function(
            lambda: float(live())
        )
        r.register(_Refused(refused))

    def observe(self, route: str, status: str, seconds: float, answer: Answer | None = None) -> None:
        """One request on `route` ended with `status` after `seconds`; `answer`: the images it got, if any."""
        self.requests.labels(route=route, status=status).inc()
        self.latency.labels(route=route).observe(seconds)
        if answer is not None:
            self.samples.inc(len(answer.images))
            if not answer.complete:
                self.incomplete.inc()


class _Refused:
    def __init__(self, refused):
        self.refused = refused

    def collect(self):
        yield by_reason(
            "atoll_requests_refused",
            "Sample requests this router refused, by reason (rate, busy, bad_request)",
            self.refused(),
        )


class ExpertMetrics(Exporter):
    """An expert's series: Predict calls, latency and rows, training progress."""

    def __init__(self, cluster: int) -> None:
        """`cluster`: the cluster this expert models (a constant series, so a dashboard can name it)."""
        super().__init__()
        r = self.registry
        Gauge("atoll_expert_cluster", "The cluster this expert models", registry=r).set(cluster)
        self.predicts = Counter("atoll_expert_predict_requests", "Predict calls, by status", ["status"], registry=r)
        self.latency = Histogram(
            "atoll_expert_predict_duration_seconds", "Time to answer one Predict", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rows = Counter("atoll_expert_predict_rows", "Noisy images answered (rows of Predict calls)", registry=r)
        self.step = Gauge("atoll_expert_train_step", "Training steps done", registry=r)
        self.loss = Gauge("atoll_expert_train_loss", "Flow-matching loss of the last training steps", registry=r)

    def observe(self, status: str, seconds: float, rows: int) -> None:
        """One Predict ended with `status` (a gRPC code name) after `seconds`, answering `rows` images."""
        self.predicts.labels(status=status).inc()
        self.latency.observe(seconds)
        self.rows.inc(rows)

    def on_event(self, event: dict) -> None:
        """Follow training progress from the role's `train` events."""
        if event.get("event") == "train":
            self.step.set(event["step"])
            self.loss.set(event["loss"])

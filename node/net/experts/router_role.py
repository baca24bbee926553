"""The router as a long-running node: derive the experts' clustering, train (or load) the router
p(cluster | x_t, t), join the swarm, and answer samples over gRPC (Router.Sample) and, with
`experts.http_port`, over HTTP (http.py) with the experts it finds live in the DHT at each
request. Both front ends share one Sampler (bounds, rate limits, batching) and one set of
Prometheus metrics.

Paper: McAllister et al., "Decentralized Diffusion Models", arXiv 2501.05450.
"""

from __future__ import annotations

import threading
import time

from node.algo.experts.nets import router_net
from node.algo.experts.router import train_router
from node.config import NodeConfig
from node.net.experts import service
from node.net.experts.metrics import RouterMetrics
from node.net.experts.roles import _Role
from node.net.experts.sampling import Sampler
from node.net.experts.training import Event, Stopped, train_checkpointed
from p2pd.admission import TokenBuckets

LIVE_REFRESH_SECONDS = 2.0  # how often the serving loop refreshes the live-expert count for metrics
LIVE_CACHE_SECONDS = 1.0  # the live experts are read from the DHT at most this often


class RouterNode(_Role):
    """The router: trains p(cluster | x_t, t) on the whole data set, then answers samples with the experts live in
    the DHT at each request."""

    def __init__(self, cfg: NodeConfig, on_event: Event = lambda e: None):
        """`cfg`: the node's NodeConfig (`experts.net`, `clusters`, `width` and `depth` shape the router, `data.seed`
        seeds it, `experts.http_port` turns the HTTP API on); `on_event(event)`: called with each event dict (ignored
        by default). Loads the data set and derives the clustering here, before joining anything: raises
        DatasetMissing and ValueError as ExpertNode does."""
        super().__init__(cfg, on_event)
        e = cfg.experts
        self.router = router_net(e.net, self.image_shape, e.clusters, e.width, e.depth, seed=cfg.data.seed)
        self.directory = cfg.checkpoint_dir.expanduser() / "router"
        self._remotes: dict[str, service.RemoteExpert] = {}
        self._live_lock = threading.Lock()
        self._live: dict[int, service.RemoteExpert] = {}
        self._live_at = -LIVE_CACHE_SECONDS
        self.sampler: Sampler | None = None
        self.http = None

    def train(self) -> str:
        """Train (or resume, or just load) the router to `experts.router_steps` steps, checkpointed under
        checkpoint_dir/router; returns the checkpoint's model sha256. Raises ValueError when that directory holds a
        checkpoint made with other settings."""
        e = self.cfg.experts
        meta = self._meta("router", e.router_steps)
        labels = self.clustering.labels

        def train(**kw) -> float:
            return train_router(
                self.router,
                self.x,
                labels,
                e.router_steps,
                batch_size=e.batch_size,
                lr=e.lr,
                seed=self.cfg.data.seed,
                every=e.checkpoint_every,
                **kw,
            )

        return train_checkpointed(
            self.router, self.directory, "router", meta, e.router_steps, train, self.on_event, self.stop_requested
        )

    def live_experts(self) -> dict[int, service.RemoteExpert]:
        """One live expert per cluster of our clustering (the lowest peer id when several), read from the DHT at
        most once every LIVE_CACHE_SECONDS whoever asks (the sampler, /healthz, /v1/experts, the metrics loop);
        channels to experts that left are closed."""
        with self._live_lock:
            if time.monotonic() - self._live_at > LIVE_CACHE_SECONDS:
                self._live = self._read_live_experts()
                self._live_at = time.monotonic()
            return dict(self._live)

    def _read_live_experts(self) -> dict[int, service.RemoteExpert]:
        chosen: dict[int, service.RemoteExpert] = {}
        for rec in sorted(self.discovery.live_peers(include_self=False), key=lambda r: r.peer_id):
            if (
                "expert" not in rec.roles
                or rec.cluster_digest != self.clustering.digest
                or not 0 <= rec.cluster < self.cfg.experts.clusters
                or rec.cluster in chosen
            ):
                continue
            key = f"{rec.peer_id}@{rec.grpc_address}/{rec.cluster}"
            if key not in self._remotes:
                self._remotes[key] = service.RemoteExpert(
                    rec.grpc_address,
                    rec.cluster,
                    self.clustering.digest,
                    self.dim,
                    self.cfg.experts.predict_timeout,
                    peer_id=rec.peer_id,
                    identity=self.identity,
                    tls=self.runtime.tls,
                )
            chosen[rec.cluster] = self._remotes[key]
        for key in [key for key, r in self._remotes.items() if r not in chosen.values()]:
            self._remotes.pop(key).close()  # an expert that left, or one a lower peer id replaced
        return chosen

    def experts_info(self) -> list[dict]:
        """The live experts for GET /v1/experts: cluster, peer id, gRPC address, images in the cluster, and the
        Predict calls (and failed ones) this router made to each."""
        sizes = self.clustering.labels.bincount(minlength=self.cfg.experts.clusters).tolist()
        return [
            dict(
                cluster=j,
                peer_id=r.peer_id,
                address=r.address,
                images=sizes[j],
                calls=r.calls,
                failures=r.failures,
            )
            for j, r in sorted(self.live_experts().items())
        ]

    def run(self) -> dict:
        """Join the swarm with role `router`, train, then serve samples until stopped; returns the final `stopped`
        event (runs served, or the training step reached). Raises OSError when the HTTP or metrics port is taken."""
        try:
            self._join(roles=("router",))
            try:
                self.train()
            except Stopped as s:
                return dict(event="stopped", step=s.step)
            e = self.cfg.experts
            self.sampler = Sampler(
                self.router,
                self.live_experts,
                e.clusters,
                self.image_shape,
                max_n=e.max_n,
                default_steps=e.sample_steps,
                per_client=TokenBuckets(e.sample_rate, e.sample_burst),
                max_image_steps=e.max_image_steps,
                max_pending=e.max_pending,
            )
            grpc_service = service.RouterService(self.sampler)
            self.metrics = RouterMetrics(e.clusters, lambda: len(self._live), lambda: dict(grpc_service.refused))
            grpc_service.observe = self.metrics.observe
            self._serve(service.register_router, grpc_service, self.metrics)
            if e.http_port is not None:
                from node.net.experts.http import HttpServer, build_app

                app = build_app(self.sampler, self.experts_info, self.metrics.observe)
                self.http = HttpServer(app, self.cfg.net.host, e.http_port)
            self.on_event(
                dict(
                    event="ready",
                    role="router",
                    peer_id=self.identity.peer_id,
                    grpc=self.runtime.server.address,
                    http=self.http.url if self.http is not None else None,
                    metrics_port=self.metrics_port,
                    maddrs=self.discovery.visible_maddrs(),
                    dht_pid=self.discovery.pid,
                )
            )
            last = 0.0
            while not self.stop_requested.wait(0.5):  # until stopped; keeps the live-expert gauge fresh
                if time.monotonic() - last > LIVE_REFRESH_SECONDS:
                    self.live_experts()
                    last = time.monotonic()
            return dict(event="stopped", runs=self.sampler.runs)
        finally:
            if self.http is not None:
                self.http.close()
            if self.sampler is not None:
                self.sampler.close()
            for r in self._remotes.values():
                r.close()
            self.close()

"""The diffusion roles as long-running nodes (the router's is router_role.py).

- ``ExpertNode``: derive the clustering, train the flow-matching expert of one cluster in
  isolation (checkpointed every `experts.checkpoint_every` steps, resumed after a crash),
  then, if asked to serve, join the swarm and answer Predict. Its record carries role
  "expert", the cluster id, the clustering's digest and the checkpoint's sha256.
- ``RouterNode``: derive the same clustering, train (or load) the router, join the swarm,
  and answer Sample with the experts it finds live in the DHT at each request.
"""

from __future__ import annotations

import logging
import threading

import torch

from node.algo.experts import flow
from node.algo.experts.cluster import to_unit
from node.config import NodeConfig
from node.net.experts import service
from node.net.experts.metrics import ExpertMetrics
from node.net.experts.training import Event, Stopped, train_checkpointed
from node.net.runtime import Runtime
from node.net.threads import set_threads
from node.protocol.worker import pick_device
from node.task import Checked
from node.task import flow as flow_task
from node.task.images import dataset
from p2pd.identity import Identity

log = logging.getLogger("atoll.experts")


def prepare(cfg: NodeConfig):
    """(data set, clustering, training images as flat [-1, 1] vectors): the same on every node of a machine, and on
    every machine that holds the same clustering file in its checkpoint_dir (node/task/flow.py: clustering)."""
    e = cfg.experts
    ds = dataset(cfg.data.dataset, 0.25, 0, None)
    cl = flow_task.clustering(
        cfg.data.dataset, e.clusters, cfg.data.seed, e.cluster_on, e.feature_steps, cfg.checkpoint_dir.expanduser()
    )
    return ds, cl, to_unit(ds.x_train)


class _Role:
    def __init__(self, cfg: NodeConfig, on_event: Event = lambda e: None):
        self.cfg, self.on_event = cfg, on_event
        self.stop_requested = threading.Event()
        set_threads(cfg.threads)
        self.ds, self.clustering, self.x = prepare(cfg)
        self.dim = self.x.shape[1]
        self.image_shape = tuple(self.ds.x_train.shape[1:])
        self.runtime: Runtime | None = None

    def request_stop(self) -> None:
        """Stop at the next checkpoint while training, or stop serving."""
        self.stop_requested.set()

    def _meta(self, role: str, steps: int, **extra) -> dict:
        """What a checkpoint of this role must match to be resumed (settings that shape the net)."""
        e = self.cfg.experts
        return dict(
            role=role,
            **extra,
            clusters=e.clusters,
            clustering=self.clustering.digest,
            net=e.net,
            cluster_on=e.cluster_on,
            width=e.width,
            depth=e.depth,
            steps=steps,
            dataset=self.cfg.data.dataset,
        )

    def _join(self, **record) -> None:
        """Join the swarm (node/net/runtime.py: the DHT forks, so before any gRPC object exists)."""
        self.identity = Identity.load_or_create(self.cfg.net.identity_path.expanduser())
        self.runtime = Runtime(self.cfg, self.identity)
        self.discovery = self.runtime.discovery
        self._record = record

    def _serve(self, register, servicer, metrics=None) -> None:
        """Serve `servicer` beside Health and Reach (same TLS and admission as a trainer), and `metrics` (an
        ExpertMetrics or RouterMetrics) on `metrics_port` unless that is null, then announce the record."""
        self.runtime.serve(services=[(register, servicer)], max_request_bytes=service.MAX_MESSAGE_BYTES)
        self.metrics_port = 0
        if metrics is not None and self.cfg.metrics_port is not None:
            self.metrics_port = metrics.serve(self.cfg.net.host, self.cfg.metrics_port)
        self.runtime.announce(
            cluster_digest=self.clustering.digest,
            dataset_size=len(self.x),
            metrics_port=self.metrics_port,
            **self._record,
        )

    def _serve_until_stopped(self) -> None:
        while not self.stop_requested.wait(0.5):
            pass

    def close(self) -> None:
        """Stop serving (metrics too) and leave the swarm."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.runtime is not None:
            self.runtime.close()


class ExpertNode(_Role):
    """The expert of cluster `experts.cluster`: trains a flow-matching denoiser on that cluster's images alone, then
    serves Predict (see the module docstring)."""

    def __init__(self, cfg: NodeConfig, on_event: Event = lambda e: None):
        """`cfg`: the node's NodeConfig (`experts.cluster` picks the cluster; `experts.width`, `depth` and `data.seed`
        shape and seed the denoiser); `on_event(event)`: called with each event dict (ignored by default). Loads the
        data set and derives the clustering here, before joining anything: raises DatasetMissing when the data set is
        not installed, ValueError for an unknown data set, a file that is not it, or more clusters than images."""
        super().__init__(cfg, on_event)
        e = cfg.experts
        self.k = e.cluster
        # the expert trainer is a task on the task contract (node/task/flow.py), its hooks checked
        self.task = Checked(
            flow_task.denoiser(
                dict(
                    dataset=cfg.data.dataset,
                    net=e.net,
                    width=e.width,
                    depth=e.depth,
                    split="clusters",
                    clusters=e.clusters,
                    cluster_on=e.cluster_on,
                    feature_steps=e.feature_steps,
                    cache_dir=str(cfg.checkpoint_dir.expanduser()),
                )
            ),
            "node.task.flow:denoiser",
        )
        self.device = pick_device(cfg.device)  # auto: a GPU where there is one; every tensor is moved explicitly
        self.data = self.task.train_data(self.k, e.clusters, cfg.data.seed).tensors[0].to(self.device)
        self.metrics = ExpertMetrics(self.k)
        self.on_event = lambda ev: (self.metrics.on_event(ev), on_event(ev))
        self.model = self.task.model(cfg.data.seed * 1000 + self.k).to(self.device)
        self.directory = cfg.checkpoint_dir.expanduser() / f"expert-{self.k}"

    def train(self) -> str:
        """Train (or resume, or just load) the expert to `experts.steps` steps, checkpointed under
        checkpoint_dir/expert-<k>; returns the checkpoint's model sha256. Raises ValueError when that directory
        holds a checkpoint made with other settings."""
        e = self.cfg.experts
        meta = self._meta("expert", e.steps, cluster=self.k)
        self.on_event(
            dict(event="expert", cluster=self.k, images=len(self.data), clusters=e.clusters, device=str(self.device))
        )
        size = min(e.batch_size, len(self.data))

        def batch_loss(gen: torch.Generator) -> torch.Tensor:
            return self.task.loss(self.model, (self.data[torch.randint(len(self.data), (size,), generator=gen)],))

        train = lambda **kw: flow.fit(  # noqa: E731
            self.model,
            batch_loss,
            e.steps,
            lr=e.lr,
            seed=self.cfg.data.seed * 1000 + self.k,
            every=e.checkpoint_every,
            **kw,
        )
        digest = train_checkpointed(
            self.model, self.directory, "expert", meta, e.steps, train, self.on_event, self.stop_requested, size
        )
        held_out = self.task.evaluate(self.model)
        self.on_event(
            dict(event="evaluated", role="expert", cluster=self.k, **{k: round(v, 4) for k, v in held_out.items()})
        )
        return digest

    def run(self, serve: bool = True) -> dict:
        """Train (or resume, or load), then serve Predict until stopped if `serve`."""
        try:
            if serve:  # the DHT forks: start it before any gRPC object exists in this process
                self._join(roles=("expert",), cluster=self.k)
            try:
                digest = self.train()
            except Stopped as s:
                return dict(event="stopped", step=s.step)
            if not serve:
                return dict(event="done", cluster=self.k, checkpoint=digest)
            svc = service.ExpertService(
                self.model,
                self.k,
                self.clustering.digest,
                self.dim,
                self.device,
                self.runtime.admission,
                observe=self.metrics.observe,
            )
            self._record["model_digest"] = digest
            self._serve(service.register_expert, svc, self.metrics)
            self.on_event(
                dict(
                    event="ready",
                    role="expert",
                    cluster=self.k,
                    peer_id=self.identity.peer_id,
                    grpc=self.runtime.server.address,
                    maddrs=self.discovery.visible_maddrs(),
                    dht_pid=self.discovery.pid,
                    checkpoint=digest,
                    metrics_port=self.metrics_port,
                )
            )
            self._serve_until_stopped()
            return dict(event="stopped", calls=svc.calls)
        finally:
            self.close()

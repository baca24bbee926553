"""The two diffusion roles as long-running nodes.

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
import time
from collections.abc import Callable
from pathlib import Path

import torch

from node.algo.experts import flow
from node.algo.experts.cluster import cluster, to_unit
from node.algo.experts.router import router_net, train_router
from node.config import NodeConfig
from node.net import checkpoint
from node.net.experts import service
from node.net.runtime import Runtime
from node.net.threads import set_threads
from node.protocol.data import load_dataset
from p2pd.admission import TokenBuckets
from p2pd.identity import Identity

log = logging.getLogger("atoll.experts")
Event = Callable[[dict], None]


def prepare(cfg: NodeConfig):
    """(data set, clustering, training images as flat [-1, 1] vectors): the same on every node."""
    ds = load_dataset(cfg.data.dataset, seed=cfg.data.seed)
    cl = cluster(ds.x_train, cfg.experts.clusters, cfg.data.seed)
    return ds, cl, to_unit(ds.x_train)


def _train_checkpointed(
    model: torch.nn.Module,
    directory: Path,
    kind: str,
    meta: dict,
    steps: int,
    train: Callable[..., float],
    on_event: Event,
    stop: threading.Event,
) -> str:
    """Train `model` to `steps` with checkpoints in `directory` (resuming from one made with the
    same `meta`); returns the final checkpoint's model sha256."""
    saved = checkpoint.load(directory, torch.device("cpu"))
    start, opt_state = 0, None
    if saved is not None:
        model_sd, optim_sd, state = saved
        if state.get("meta") != meta:
            raise ValueError(
                f"{directory} holds a checkpoint of another {kind} ({state.get('meta')}); use another checkpoint_dir"
            )
        model.load_state_dict(model_sd)
        start = int(state["step"])
        opt_state = _unflatten_optim(optim_sd, state["optim"]) if start < steps else None
        log.info("%s: resuming at step %d of %d", kind, start, steps)
    if start >= steps:
        return checkpoint.load(directory, torch.device("cpu"))[2]["sha256"]["model"]
    t0 = time.monotonic()
    report = max(1, steps // 10)

    def on_checkpoint(step, opt):
        flat, layout = _flatten_optim(opt.state_dict())
        checkpoint.save(directory, model.state_dict(), flat, dict(meta=meta, step=step, optim=layout))
        if stop.is_set():
            raise _Stopped(step)

    def progress(step, loss):
        if step % report == 0 or step == steps:
            on_event(
                dict(
                    event="train",
                    role=kind,
                    step=step,
                    steps=steps,
                    loss=round(loss, 4),
                    seconds=round(time.monotonic() - t0, 1),
                )
            )

    try:
        loss = train(start=start, opt_state=opt_state, on_checkpoint=on_checkpoint, progress=progress)
    except _Stopped as s:
        raise _Stopped(s.step) from None
    on_event(
        dict(event="trained", role=kind, steps=steps, loss=round(loss, 4), seconds=round(time.monotonic() - t0, 1))
    )
    return checkpoint.load(directory, torch.device("cpu"))[2]["sha256"]["model"]


class _Stopped(Exception):
    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step


def _flatten_optim(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state dict as named tensors (safetensors) plus a JSON layout."""
    tensors, layout = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        layout["state"][str(pid)] = {}
        for name, v in st.items():
            key = f"{pid}.{name}"
            tensors[key] = v if torch.is_tensor(v) else torch.tensor(v)
            layout["state"][str(pid)][name] = key
    return tensors, layout


def _unflatten_optim(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state = {
        int(pid): {name: tensors[key] for name, key in entries.items()} for pid, entries in layout["state"].items()
    }
    return {"state": state, "param_groups": layout["param_groups"]}


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
        self.stop_requested.set()

    def _meta(self, role: str, steps: int, **extra) -> dict:
        """What a checkpoint of this role must match to be resumed (settings that shape the net)."""
        e = self.cfg.experts
        return dict(
            role=role,
            **extra,
            clusters=e.clusters,
            clustering=self.clustering.digest,
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

    def _serve(self, register, servicer) -> None:
        """Serve `servicer` beside Health and Reach (same TLS and admission as a trainer), then
        announce the record."""
        self.runtime.serve(services=[(register, servicer)], max_request_bytes=service.MAX_MESSAGE_BYTES)
        self.runtime.announce(cluster_digest=self.clustering.digest, dataset_size=len(self.x), **self._record)

    def _serve_until_stopped(self) -> None:
        while not self.stop_requested.wait(0.5):
            pass

    def close(self) -> None:
        """Stop serving and leave the swarm."""
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
        self.data = self.x[self.clustering.labels == self.k]
        self.model = flow.denoiser(self.dim, e.width, e.depth, seed=cfg.data.seed * 1000 + self.k)
        self.directory = cfg.checkpoint_dir.expanduser() / f"expert-{self.k}"

    def train(self) -> str:
        """Train (or resume, or just load) the expert to `experts.steps` steps, checkpointed under
        checkpoint_dir/expert-<k>; returns the checkpoint's model sha256. Raises ValueError when that directory
        holds a checkpoint made with other settings."""
        e = self.cfg.experts
        meta = self._meta("expert", e.steps, cluster=self.k)
        self.on_event(dict(event="expert", cluster=self.k, images=len(self.data), clusters=e.clusters))
        train = lambda **kw: flow.train_denoiser(  # noqa: E731
            self.model,
            self.data,
            e.steps,
            batch_size=e.batch_size,  # noqa: E731
            lr=e.lr,
            seed=self.cfg.data.seed * 1000 + self.k,
            every=e.checkpoint_every,
            **kw,
        )
        return _train_checkpointed(
            self.model, self.directory, "expert", meta, e.steps, train, self.on_event, self.stop_requested
        )

    def run(self, serve: bool = True) -> dict:
        """Train (or resume, or load), then serve Predict until stopped if `serve`."""
        try:
            if serve:  # the DHT forks: start it before any gRPC object exists in this process
                self._join(roles=("expert",), cluster=self.k)
            try:
                digest = self.train()
            except _Stopped as s:
                return dict(event="stopped", step=s.step)
            if not serve:
                return dict(event="done", cluster=self.k, checkpoint=digest)
            svc = service.ExpertService(
                self.model, self.k, self.clustering.digest, self.dim, torch.device("cpu"), self.runtime.admission
            )
            self._record["model_digest"] = digest
            self._serve(service.register_expert, svc)
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
                )
            )
            self._serve_until_stopped()
            return dict(event="stopped", calls=svc.calls)
        finally:
            self.close()


class RouterNode(_Role):
    """The router: trains p(cluster | x_t, t) on the whole data set, then answers Sample with the experts live in the
    DHT at each request."""

    def __init__(self, cfg: NodeConfig, on_event: Event = lambda e: None):
        """`cfg`: the node's NodeConfig (`experts.clusters`, `width` and `depth` shape the router, `data.seed` seeds
        it); `on_event(event)`: called with each event dict (ignored by default). Loads the data set and derives the
        clustering here, before joining anything: raises DatasetMissing and ValueError as ExpertNode does."""
        super().__init__(cfg, on_event)
        e = cfg.experts
        self.router = router_net(self.dim, e.clusters, e.width, e.depth, seed=cfg.data.seed)
        self.directory = cfg.checkpoint_dir.expanduser() / "router"
        self._remotes: dict[str, service.RemoteExpert] = {}

    def train(self) -> str:
        """Train (or resume, or just load) the router to `experts.router_steps` steps, checkpointed under
        checkpoint_dir/router; returns the checkpoint's model sha256. Raises ValueError when that directory holds a
        checkpoint made with other settings."""
        e = self.cfg.experts
        meta = self._meta("router", e.router_steps)
        labels = self.clustering.labels
        train = lambda **kw: train_router(  # noqa: E731
            self.router,
            self.x,
            labels,
            e.router_steps,
            batch_size=e.batch_size,  # noqa: E731
            lr=e.lr,
            seed=self.cfg.data.seed,
            every=e.checkpoint_every,
            **kw,
        )
        return _train_checkpointed(
            self.router, self.directory, "router", meta, e.router_steps, train, self.on_event, self.stop_requested
        )

    def live_experts(self) -> dict[int, service.RemoteExpert]:
        """One live expert per cluster of our clustering (the lowest peer id when several)."""
        chosen: dict[int, service.RemoteExpert] = {}
        for rec in self.discovery.live_peers(include_self=False):
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
        return chosen

    def run(self) -> dict:
        """Join the swarm with role `router`, train, then serve Sample until stopped; returns the final `stopped` event
        (runs served, or the training step reached)."""
        try:
            self._join(roles=("router",))
            try:
                self.train()
            except _Stopped as s:
                return dict(event="stopped", step=s.step)
            e = self.cfg.experts
            self.service = service.RouterService(
                self.router,
                self.live_experts,
                e.clusters,
                self.dim,
                self.image_shape,
                max_n=e.max_n,
                default_steps=e.sample_steps,
                per_client=TokenBuckets(e.sample_rate, e.sample_burst),
                max_image_steps=e.max_image_steps,
            )
            self._serve(service.register_router, self.service)
            self.on_event(
                dict(
                    event="ready",
                    role="router",
                    peer_id=self.identity.peer_id,
                    grpc=self.runtime.server.address,
                    maddrs=self.discovery.visible_maddrs(),
                    dht_pid=self.discovery.pid,
                )
            )
            self._serve_until_stopped()
            return dict(event="stopped", runs=self.service.runs)
        finally:
            if getattr(self, "service", None) is not None:
                self.service.close()
            for r in self._remotes.values():
                r.close()
            self.close()

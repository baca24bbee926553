"""atoll inside your own training loop: a `Peer` joins the swarm with your model and, each time
you call `step()`, runs one round of the configured exchange on it in place (publish, fetch the
neighbours' models, mix: the gossip schedule, robust aggregation and trust scores of the config);
`finish()` runs the end of training (the final merge when `comm.final_merge` is set).

    from node.net.peer import Peer

    with Peer.around(model, "node.yaml", dataset_size=len(my_data)) as peer:
        peer.wait()                          # for the swarm's other members
        for r in range(peer.rounds):
            train_a_little(model, my_data)   # your steps, your optimizer
            peer.step()                      # gossip with the neighbours, in place
        peer.finish()

The daemon (`atoll node start`, node/net/daemon.py) joins through the same `Peer.join`, with a
worker that trains the task itself. A peer's model must have the same parameter names and
shapes on every node (their digest is signed into the record; peers of another shape are not
exchanged with).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from node.config import ConfigError, NodeConfig, load_config, node_config
from node.net import netcheck
from node.net.grpc_exchange import GrpcExchange
from node.net.metrics import NodeMetrics
from node.net.runtime import Runtime
from node.protocol.compression import record_codec
from node.protocol.engine import Engine
from node.protocol.rounds import RoundResult
from node.protocol.train import RoundStats
from node.protocol.worker import NonFinite, Worker, device_label
from node.task import Checked, Task, TensorDataset
from p2pd.identity import Identity


class HostedWorker(Worker):
    """A worker around a model that its owner trains: the rounds' training is a no-op (the
    owner's steps happened before `Peer.step`), everything else is a Worker's (what is published,
    the rollback state, the defence)."""

    def round_start(self) -> dict[str, torch.Tensor]:
        """The model as the last step left it (the owner trained since): updates and trust
        signals are measured from there."""
        if self._good is None:
            return super().round_start()
        return {k: self._good[0][k].clone() for k in self.state()}

    def train(self, r: int, stop=lambda: False) -> RoundStats:
        """No training here; refuses a model that became non-finite (NonFinite)."""
        if not self.all_finite():
            raise NonFinite("model_after_training")
        return RoundStats(0.0, 0, 0, 0.0)


def hosted_task(
    model: nn.Module, dataset_size: int, evaluate: Callable[[nn.Module], dict] | None, metric: str = ""
) -> Task:
    """The task of a hosted model: the model itself, `dataset_size` (the weight of this node in
    averages) as its data, no loss of atoll's, and the owner's `evaluate` with `metric` the one
    reported (default: none)."""
    return Task(
        name=f"hosted/{type(model).__name__}",
        model=lambda seed: model,
        train_data=lambda index, count, seed: TensorDataset(torch.zeros(dataset_size, 1)),
        loss=lambda m, batch: torch.zeros(()),
        evaluate=evaluate or (lambda m: {"none": 0.0}),
        metric="none" if evaluate is None else metric,
    )


class Peer:
    """One member of a swarm: its runtime (DHT membership, gRPC server), exchange and round
    engine around `worker`. Build one with `Peer.around` (your own loop) or `Peer.join` (the
    daemon). `rounds`: train.rounds of the config; `round`: the next round `step` runs."""

    def __init__(self, cfg: NodeConfig, worker: Worker, runtime: Runtime, exchange: GrpcExchange, stop, metrics):
        """`cfg`: the node's NodeConfig; `worker`: its Worker; `runtime`: its joined Runtime; `exchange`: the
        GrpcExchange serving on it; `stop`: the threading.Event set to stop; `metrics`: its NodeMetrics. Builds the
        round engine: raises ValueError as Engine does."""
        self.cfg, self.worker, self.runtime, self.exchange, self.stop = cfg, worker, runtime, exchange, stop
        self.metrics = metrics
        self.engine = Engine(cfg, worker, exchange)
        self.rounds, self.round = cfg.train.rounds, 0
        self._checking: threading.Thread | None = None  # the reachability check (see announce)

    @classmethod
    def join(
        cls,
        cfg: NodeConfig,
        worker: Worker,
        identity: Identity,
        metrics: NodeMetrics,
        stop: threading.Event,
        before_serving: Callable[[Runtime], None] = lambda runtime: None,
    ) -> Peer:
        """Join the swarm with `worker`: the DHT, then `before_serving(runtime)` (the daemon says
        it is joinable and resumes its checkpoint there), then the final merge's averager and the
        gRPC server. Not announced yet: see `announce`. Raises DiscoveryError, OSError."""
        runtime = Runtime(cfg, identity)
        try:
            before_serving(runtime)
            exchange = GrpcExchange(cfg, runtime, worker.state(), metrics, stop, worker.task_digest)
        except BaseException:
            runtime.close()
            raise
        return cls(cfg, worker, runtime, exchange, stop, metrics)

    def announce(self, start_round: int = 0, metrics_port: int = 0) -> None:
        """Check this node's own address and key, publish its signed record (at round
        `start_round`) and check its reachability in the background. Raises KeyInUse."""
        self.round = start_round
        runtime, worker, cfg = self.runtime, self.worker, self.cfg
        advertised, tls, discovery = runtime.advertised, runtime.tls, runtime.discovery
        netcheck.check_own_address(advertised, tls)
        discovery.read_own_bucket()  # before announcing: is this key already live elsewhere?
        netcheck.check_key_in_use(discovery, advertised, tls, cfg.net.identity_path)
        runtime.announce(
            device=device_label(worker.device),
            dataset_size=worker.dataset_size,
            round=start_round,
            proxy_digest=worker.proxy_digest,
            task_digest=worker.task_digest,
            codec=record_codec(cfg.comm),
            roles=("trainer",),
            metrics_port=metrics_port,
        )
        forced = cfg.net.reachability
        if forced != "auto":  # the operator's word, published at once; the check still reports
            self.exchange.reachable_as(forced)

        def check() -> None:
            args = (discovery, advertised, tls, self.metrics, self.stop, cfg.comm.join_timeout)
            connect = runtime.plane.connect if runtime.plane is not None else None
            state = netcheck.check_reachability(*args, relay=cfg.net.relay, forced=forced, connect=connect)
            if state is not None and forced == "auto" and not self.stop.is_set():
                self.exchange.reachable_as(state)

        self._checking = threading.Thread(target=check, name="atoll-reachability", daemon=True)
        self._checking.start()

    @classmethod
    def around(
        cls,
        model: nn.Module,
        config: NodeConfig | str | Path | dict | None = None,
        *,
        dataset_size: int = 1,
        evaluate: Callable[[nn.Module], dict] | None = None,
        metric: str = "",
    ) -> Peer:
        """Join with your own `model` (trained by you; mixed in place by `step`). `config`: a
        NodeConfig, a node YAML path or a dict of its fields (task, data and model are not
        used); `dataset_size`: this node's weight in averages; `evaluate(model)` -> {name:
        float} with `metric` the one that counts. Returns once joined and announced:
        `wait()` for the other members. Raises ConfigError, DiscoveryError, OSError, KeyInUse."""
        if isinstance(config, NodeConfig):
            cfg = config
        elif isinstance(config, dict):
            cfg = node_config(config)
        else:
            cfg = load_config(config, {})
        if not any(True for _ in model.parameters()):
            raise ConfigError("a Peer needs a model with parameters")
        if cfg.comm.exchange != "model":
            raise ConfigError("invalid config: a Peer around your model exchanges models: comm.exchange must be model")
        task = Checked(hosted_task(model, dataset_size, evaluate, metric), "your model")
        worker = HostedWorker(cfg, next(model.parameters()).device, task=task)
        stop = threading.Event()
        peer = cls.join(cfg, worker, Identity.load_or_create(cfg.net.identity_path), NodeMetrics(), stop)
        try:
            peer.announce()
        except BaseException:
            peer.close()
            raise
        peer.worker.keep_good_state()
        return peer

    @property
    def maddrs(self) -> list[str]:
        """The multiaddrs others join this swarm through (`--initial-peers`)."""
        return self.runtime.discovery.visible_maddrs()

    def wait(self, members: int | None = None, say: Callable[[dict], None] = lambda event: None) -> int:
        """Wait until `members` nodes are live (default comm.min_peers, else node_count for a
        fresh start and 1 for a resumed one), at most comm.join_timeout seconds; `say(event)`
        hears each change of the count. Returns how many are live."""
        c = self.cfg.comm
        if members is None:
            members = c.min_peers if c.min_peers is not None else (self.cfg.node_count if self.round == 0 else 1)
        self.exchange.wait_for_members(members, c.join_timeout, say)
        if self._checking is not None and self.exchange.live > 1:  # start on the path the check finds
            self._checking.join(timeout=30.0)
        return self.exchange.live

    def step(self) -> RoundResult:
        """One round of the exchange on the model, in place: publish it, fetch the neighbours'
        (bounded by comm.fetch_timeout), mix. Raises NonFinite when the model (yours, or after
        the mix) is not finite; nothing non-finite is published."""
        result = self.engine.step(self.round)
        self.round += 1
        self.worker.keep_good_state()
        return result

    def finish(self) -> int | None:
        """The end of training: the final merge's group size when comm.final_merge is set, else
        None (the last model is still published for slower neighbours)."""
        return self.engine.finish()

    def close(self) -> None:
        """Leave the swarm: stop serving, stop the DHT and its processes, and the data loader's
        worker processes."""
        self.stop.set()
        self.exchange.close()
        self.worker.trainer.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

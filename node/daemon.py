"""The node loop: join, then per round train, publish, fetch neighbours, mix, evaluate,
checkpoint; leave cleanly on SIGTERM; resume from the checkpoint after a crash.

Round protocol (decentralized SGD, one gossip step per round):
1. train locally for the round's budget (steps or seconds);
2. publish the model as snapshot (model, r, 0) and sign its digest into the record (round=r);
3. for each neighbour in the round's graph over the live peers: ask its Health for its signed
   record; once it has published round r, fetch that snapshot (checked against the digest it
   signed); a neighbour that has not answered by the deadline is skipped this round;
4. mix with Metropolis-Hastings weights renormalised over the neighbours that answered;
5. evaluate, export metrics, checkpoint (next round r+1).
Other exchanges follow the same publish-then-fetch pattern: a gossip schedule runs steps 2-4
once per gossip step q (snapshots (model, r, q)); MoDeST samples trainers and aggregators
(node/comm/modest.py); with `comm.exchange: logits` (any mix of architectures) step 2 publishes
the node's logits on the shared proxy set as (logits, r, 0), neighbours whose record names
another proxy digest are skipped, and step 4 is distillation from the neighbours' logits
(node/distill/).
After the last round the node publishes its final model as round R and keeps serving until
every live peer has reached R (or a timeout), so slower neighbours can still fetch from it.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node import aggregate, checkpoint, distill, membership
from node.aggregate.vectors import flatten, unflatten
from node.comm import modest
from node.comm.backoff import Backoff
from node.comm.mixing import metropolis_hastings, renormalise
from node.comm.schedule import allotment
from node.comm.topology import degree, neighbours
from node.config import ConfigError, NodeConfig
from node.data import load_dataset, partition
from node.metrics import NodeMetrics
from node.models import build_model
from node.security import Attack, flip_labels
from node.security.defence import Defence
from node.security.trust import TrustTracker
from node.threads import set_threads
from node.train import (
    LocalTrainer,
    RoundStats,
    evaluate,
    make_optimizer,
    optimizer_tensors,
    restore_optimizer,
    round_lr,
    set_lr,
)
from p2pd import __version__
from p2pd.addresses import host_port
from p2pd.admission import Admission
from p2pd.client import FetchError, SwarmClient
from p2pd.discovery import Discovery, DiscoveryError
from p2pd.errors import ReasonedError
from p2pd.identity import Identity
from p2pd.records import RecordRefused, open_record
from p2pd.server import SnapshotStore, SwarmServer, TLSConfig
from p2pd.tensors import SnapshotKey, pack

log = logging.getLogger("atoll.node")


class KeyInUse(RuntimeError):
    """Another live process serves this node's peer id (a copied key file)."""


class Diverged(RuntimeError):
    """The model kept becoming non-finite (NaN/Inf) after rolling back: MAX_ROLLBACKS in a row."""


class _NonFinite(Exception):
    """This round made the loss or the model non-finite; `where` is the metric reason."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


MAX_ROLLBACKS = 3  # consecutive non-finite rounds before the node gives up with an error


def pick_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu. Chosen once; every tensor is moved explicitly."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available on this machine")
    return dev


class Node:
    def __init__(self, cfg: NodeConfig, on_event: Callable[[dict], None] = lambda e: None):
        self.cfg = cfg
        self.on_event = on_event
        self.stop_requested = threading.Event()
        self.metrics = NodeMetrics()
        self._clients: dict[str, SwarmClient] = {}
        self.backoff = Backoff()  # unreachable neighbours, skipped for a few rounds
        self._peers_live = 0
        self.merged_with: int | None = None  # final merge: group size, 0 = missed, None = not run
        self._received_bytes = 0
        self._lock = threading.Lock()
        self.discovery: Discovery | None = None
        self.server: SwarmServer | None = None

    def request_stop(self) -> None:
        self.stop_requested.set()

    # -- setup -----------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.device = pick_device(cfg.device)
        self.threads = set_threads(cfg.threads)
        self.identity = Identity.load_or_create(cfg.net.identity_path)
        self.ckpt_dir = Path(cfg.checkpoint_dir).expanduser()
        ds = load_dataset(
            cfg.data.dataset, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed, path=cfg.data.path
        )
        pool = np.arange(len(ds.y_train))
        self.logits = cfg.comm.exchange == "logits"
        self.proxy_digest = ""
        if self.logits:  # the proxy set is nobody's labelled data: it leaves the pool first
            try:
                proxy_idx, self.proxy_digest = distill.proxy_split(
                    len(pool), cfg.distill.proxy_size, cfg.data.seed, cfg.data.dataset
                )
            except ValueError as e:
                raise ConfigError(f"invalid config: distill.proxy_size: {e}") from None
            pool = np.setdiff1d(pool, proxy_idx)
            self.proxy_x = ds.x_train[torch.from_numpy(proxy_idx)].to(self.device)
        parts = partition(
            ds.y_train.numpy()[pool],
            cfg.node_count,
            cfg.data.partition,
            alpha=cfg.data.alpha,
            shards_per_node=cfg.data.shards_per_node,
            seed=cfg.data.seed,
        )
        mine = torch.from_numpy(pool[parts[cfg.node_index]])
        self.x, self.y = ds.x_train[mine].to(self.device), ds.y_train[mine].to(self.device)
        sec = cfg.security
        self.attack = Attack(sec.attack, **sec.attack_params) if sec.attack else None
        if self.attack is not None and self.attack.flips_labels:
            self.y = flip_labels(self.y, ds.num_classes)
        self.x_test, self.y_test = ds.x_test.to(self.device), ds.y_test.to(self.device)
        # one shared init: every node builds the model from the same seed
        self.model = build_model(cfg.model.family, ds.input_shape, ds.num_classes, cfg.model.width, cfg.train.seed).to(
            self.device
        )
        o = cfg.optim
        self.optimizer = make_optimizer(self.model, o.name, o.lr, o.momentum, o.weight_decay)
        self.trainer = LocalTrainer(
            self.model,
            self.optimizer,
            self.x,
            self.y,
            o.batch_size,
            seed=cfg.train.seed * 7919 + cfg.node_index,
            sam_rho=o.sam_rho,
        )
        self.init_vector = flatten(self.model.state_dict())  # the shared init (free riders publish it)
        self.defence = Defence(
            sec.aggregator,
            self.model,
            self.x,
            self.y,
            ds.num_classes,
            sec.byzantine_fraction,
            seed=cfg.train.seed * 7919 + cfg.node_index,
            tracker=TrustTracker(flag_below=sec.flag_below, sybil_similarity=sec.sybil_similarity),
        )
        self._honest_seen: list = []  # neighbour models of the last exchange (what alie/ipm attackers use)
        self._round_start: dict | None = None
        self._trust_view: tuple = ({}, [])  # (signals by peer, sybil clusters), replaced whole each exchange
        self.metrics.watch_trust(lambda: self._trust_view, sec.metrics_top_n)
        if self.logits:
            self.num_classes = ds.num_classes
            # its own momentum-free optimizer: see node.distill.kd.distill_steps
            self.distill_opt = torch.optim.SGD(self.model.parameters(), lr=cfg.distill.lr or o.lr)
            self.proxy_rows = distill.speaking_rows(
                distill.uses_filter(cfg.distill.method), self.x, self.proxy_x, cfg.data.seed
            )
        self.start_round = 0
        restored = checkpoint.load(self.ckpt_dir, self.device)
        if restored is not None:
            self._restore(*restored)

        # The DHT forks a child process: start it before any gRPC object exists here.
        self.discovery = membership.join(cfg.net, self.identity)
        self.merger = None
        if cfg.comm.final_merge:  # forks the averager process: before any gRPC object exists
            from node.merge import FinalMerge

            self.merger = FinalMerge(
                self.discovery.dht,
                cfg.net.swarm,
                self.model.state_dict(),
                cfg.node_count,
                cfg.comm.merge_timeout,
                how=cfg.comm.merge,
            )
        self.tls = None
        if cfg.net.tls_cert or cfg.net.tls_key:
            self.tls = TLSConfig(cfg.net.tls_cert, cfg.net.tls_key, cfg.net.tls_ca)
        self.store = SnapshotStore(keep=cfg.comm.keep_snapshots)
        c = cfg.comm
        self.gossip_steps = allotment(
            c.schedule,
            cfg.train.rounds,
            cfg.train.rounds if c.gossip_budget is None else c.gossip_budget,
            c.late_shape,
        )
        admission = Admission(self.identity.peer_id, self.discovery.is_known, sec.fetch_rate, sec.fetch_burst)
        self.server = SwarmServer(
            self.store,
            self.discovery.signed_record,
            host=cfg.net.host,
            port=cfg.net.grpc_port,
            tls=self.tls,
            admission=admission,
            address_of=self.discovery.address_of,
            dial=self._peer_at,
        )
        self.server.start()
        servicer = self.server.servicer
        self.metrics.watch(
            lambda: servicer.stats["bytes_sent"], lambda: dict(self.discovery.refused), lambda: dict(servicer.refused)
        )
        self.metrics_port = None
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.net.host, cfg.metrics_port)
        self.dataset_size = len(self.x)
        advertised = host_port(cfg.net.advertise_host or cfg.net.host, self.server.port)
        self.advertised = advertised
        self._check_own_address()
        self.discovery.live_peers()  # before announcing: is this key already live elsewhere?
        self._check_key_in_use()
        self.discovery.announce(
            grpc_address=advertised,
            device=_device_label(self.device),
            dataset_size=self.dataset_size,
            round=self.start_round,
            proxy_digest=self.proxy_digest,
            roles=("trainer",),
            software_version=__version__,
            metrics_port=self.metrics_port or 0,
        )
        threading.Thread(target=self._check_reachability, name="atoll-reachability", daemon=True).start()
        self.on_event(
            dict(
                event="ready",
                peer_id=self.identity.peer_id,
                grpc=self.server.address,
                maddrs=self.discovery.visible_maddrs(),
                metrics_port=self.metrics_port,
                start_round=self.start_round,
                dataset_size=self.dataset_size,
                device=str(self.device),
                threads=self.threads,
                dht_pid=self.discovery.pid,
            )
        )

    def _restore(self, model_sd: dict, optim_t: dict, state: dict) -> None:
        """Resume from a checkpoint, or raise CheckpointError saying what does not fit."""
        cfg, where = self.cfg, self.ckpt_dir
        if state.get("peer_id") not in (None, self.identity.peer_id):
            raise checkpoint.CheckpointError(f"checkpoint in {where} belongs to another node ({state.get('peer_id')})")
        for key, want in (
            ("optimizer", cfg.optim.name),
            ("node_index", cfg.node_index),
            ("node_count", cfg.node_count),
            ("model", f"{cfg.model.family}/{cfg.model.width}"),
        ):
            if key in state and state[key] != want:
                raise checkpoint.CheckpointError(
                    f"checkpoint in {where} was written with {key}={state[key]}, the config says {want}: "
                    f"use the same setting or another checkpoint_dir"
                )
        r = state.get("round")
        if not isinstance(r, int) or r < 0 or not isinstance(state.get("optim"), dict):
            raise checkpoint.CheckpointError(f"checkpoint state in {where} is malformed")
        try:
            self.model.load_state_dict(model_sd)
            restore_optimizer(self.optimizer, optim_t, state["optim"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint in {where} does not fit this model/optimizer: {e}") from None
        for group in self.optimizer.param_groups:  # the config wins over the saved hyperparameters
            group["weight_decay"] = cfg.optim.weight_decay
            if "momentum" in group:
                group["momentum"] = cfg.optim.momentum
        self.start_round = r
        self.metrics.checkpoint_time = float(state.get("time", 0.0))
        log.info("resumed from checkpoint at round %d", r)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self._setup()
            self._wait_for_peers()
            accuracy, loss = None, None
            rounds = self.cfg.train.rounds
            r = self.start_round
            self._keep_good_state()
            while r < rounds and not self.stop_requested.is_set():
                t0 = time.perf_counter()
                try:
                    stats, mixed_with = self._round(r, rounds)
                    if not self._all_finite():
                        raise _NonFinite("model_after_mixing")
                except _NonFinite as e:
                    self._roll_back(r, e.where)
                    continue  # the round again, from the last good state
                except DiscoveryError:
                    if not self.stop_requested.is_set():
                        raise
                    # a stop signal sent to every process (systemd's default) also ended the DHT
                    log.info("the DHT is gone while stopping; checkpointing round %d", r)
                    break
                if self.stop_requested.is_set():
                    break  # the round was cut short: it is redone after a restart
                self._check_key_in_use(running=True)
                loss = stats.loss if stats.steps else (loss or 0.0)
                accuracy = evaluate(self.model, self.x_test, self.y_test)
                r += 1
                self._keep_good_state()
                self._checkpoint(r, accuracy)
                self.metrics.round_seconds.observe(time.perf_counter() - t0)
                self._observe(r, loss, accuracy, stats.samples_per_second, mixed_with)
                self.on_event(
                    dict(
                        event="round",
                        round=r,
                        rounds=rounds,
                        loss=round(loss, 5),
                        accuracy=round(accuracy, 5),
                        mixed=len(mixed_with),
                        peers=self._peers_live,
                        sent_bytes=self.server.servicer.stats["bytes_sent"],
                        received_bytes=self._received_bytes,
                        seconds=round(time.perf_counter() - t0, 3),
                    )
                )
            finished = r >= rounds
            if finished:
                if self.cfg.comm.algorithm == "modest":
                    self._adopt_final_aggregate(rounds)
                self._finish(rounds)
                accuracy = evaluate(self.model, self.x_test, self.y_test)
            else:
                self._checkpoint(r, accuracy)
            summary = dict(
                event="done" if finished else "stopped",
                round=r,
                accuracy=accuracy,
                model_digest=pack(self.model.state_dict()).hexdigest,
                merged_with=self.merged_with,
                peer_id=self.identity.peer_id,
                sent_bytes=self.server.servicer.stats["bytes_sent"],
                received_bytes=self._received_bytes,
                dataset_size=self.dataset_size,
            )
            self.on_event(summary)
            return summary
        finally:
            self._teardown()

    def _round(self, r: int, rounds: int) -> tuple[RoundStats, list[str]]:
        """One round of the configured exchange: (training stats, neighbours mixed with)."""
        if self.cfg.comm.algorithm == "modest":
            return self._modest_round(r, rounds)
        if self.logits:
            return self._distill_round(r, rounds)
        self._round_start = {k: v.clone() for k, v in self.model.state_dict().items()}
        stats = self._train(r, rounds)
        mixed_with: list[str] = []
        if self.stop_requested.is_set():
            return stats, mixed_with  # the caller checkpoints round r: it restarts from this model
        for q in range(self.gossip_steps[r]):
            mixed_with = self._gossip(r, q, stats.samples_per_second)
        if not self.gossip_steps[r]:  # no gossip this round: still tell the swarm where we are
            self.discovery.update(round=r, step=0, samples_per_second=round(stats.samples_per_second, 3))
        return stats, mixed_with

    def _wait_for_peers(self) -> None:
        """Before the first round, wait (up to comm.join_timeout) until comm.min_peers nodes are
        live, by default all node_count of them on a fresh start; say so while waiting."""
        c = self.cfg.comm
        want = c.min_peers if c.min_peers is not None else (self.cfg.node_count if self.start_round == 0 else 1)
        deadline, said = time.monotonic() + c.join_timeout, None
        while not self.stop_requested.is_set():
            try:
                live = self.discovery.live_peers()
            except DiscoveryError:
                if self.stop_requested.is_set():
                    return
                raise
            self._set_peers(len(live))
            if len(live) >= want:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "only %d of %d nodes live after %.0f s (comm.join_timeout); starting anyway",
                    len(live),
                    want,
                    c.join_timeout,
                )
                return
            if said != len(live):  # once per change, not every poll
                said = len(live)
                self.on_event(
                    dict(
                        event="waiting",
                        live=len(live),
                        want=want,
                        seconds_left=round(left),
                        peers=[p.peer_id for p in live],
                    )
                )
            time.sleep(0.2)

    def _train(self, r: int, rounds: int):
        """Local training of round r; raises _NonFinite before anything of it is published."""
        o = self.cfg.optim
        set_lr(self.optimizer, round_lr(o.lr, o.schedule, r, rounds, o.final_lr_fraction))
        stats = self.trainer.train_round(
            r, self.cfg.train.local_steps, self.cfg.train.local_seconds, stop=self.stop_requested.is_set
        )
        if stats.steps and not math.isfinite(stats.loss):
            raise _NonFinite("loss")
        if not self._all_finite():
            raise _NonFinite("model_after_training")
        return stats

    def _all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())

    def _keep_good_state(self) -> None:
        """Remember the model and optimizer as they are now (finite: checked by the caller), the
        state a non-finite round rolls back to."""
        self._good = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
        )
        self._rollbacks_in_a_row = 0

    def _roll_back(self, r: int, where: str) -> None:
        """Undo a round that went non-finite: nothing of it was checkpointed, and no non-finite
        model was published (the check runs before every publish). Raises Diverged when it keeps
        happening: lowering the step size silently would hide a broken run."""
        self.metrics.rollbacks.labels(reason=where).inc()
        self._rollbacks_in_a_row += 1
        model_sd, optim_sd = self._good
        self.model.load_state_dict(model_sd)
        self.optimizer.load_state_dict(copy.deepcopy(optim_sd))
        if self._rollbacks_in_a_row >= MAX_ROLLBACKS:
            raise Diverged(
                f"the {where.replace('_', ' ')} became non-finite (NaN/Inf) in round {r} "
                f"{MAX_ROLLBACKS} times in a row, each time rolled back to the last good state; "
                f"the last good checkpoint is kept. Lower optim.lr or check the data"
            )
        log.warning(
            "round %d: %s became non-finite (NaN/Inf); rolled back to the last good state and "
            "redoing the round (%d of %d)",
            r,
            where.replace("_", " "),
            self._rollbacks_in_a_row,
            MAX_ROLLBACKS,
        )

    def _modest_round(self, r: int, rounds: int):
        """One MoDeST round (see node/comm/modest.py): train if sampled as a trainer (starting
        from the previous round's aggregate), aggregate if sampled as an aggregator."""
        c = self.cfg.comm
        live = self.discovery.live_peers()
        self._set_peers(len(live))
        ids = [p.peer_id for p in live]
        addr = {p.peer_id: p.grpc_address for p in live}
        size = {p.peer_id: max(1, p.dataset_size) for p in live}
        me, seed = self.identity.peer_id, self.cfg.train.seed
        trainers, aggs = modest.sample(ids, r, seed, c.modest_trainers, c.modest_aggregators)
        stats, mixed = RoundStats(0.0, 0, 0, 0.0), []
        if me in trainers:
            if r > 0:
                self._adopt_aggregate(ids, addr, r - 1)
            stats = self._train(r, rounds)
            if self.stop_requested.is_set():
                return stats, mixed
            self._publish(
                SnapshotKey("model", r, 0),
                self.model.state_dict(),
                samples_per_second=round(stats.samples_per_second, 3),
            )
        if me in aggs:
            own = self.model.state_dict()
            models = self._fetch_all(
                [t for t in trainers if t != me and t in addr], addr, SnapshotKey("model", r, 0), _model_like(own)
            )
            if me in trainers:
                models[me] = own
            if models:
                names = sorted(models)
                self.model.load_state_dict(aggregate.mean([models[j] for j in names], [size.get(j, 1) for j in names]))
            mixed = sorted(j for j in models if j != me)
            self._publish(SnapshotKey("model", r, modest.AGGREGATE_STEP), self.model.state_dict())
        elif me not in trainers:
            self.discovery.update(round=r, step=0)
        return stats, mixed

    def _adopt_aggregate(self, ids: list[str], addr: dict, r: int) -> bool:
        """Load round r's aggregate from the first of its aggregators that delivers it."""
        c = self.cfg.comm
        _, aggs = modest.sample(ids, r, self.cfg.train.seed, c.modest_trainers, c.modest_aggregators)
        if self.identity.peer_id in aggs:
            return True  # we made it ourselves: our model is that aggregate
        own = self.model.state_dict()
        for a in aggs:
            if a in addr:
                sd = self._fetch_round(
                    a,
                    addr[a],
                    SnapshotKey("model", r, modest.AGGREGATE_STEP),
                    _model_like(own),
                    time.monotonic() + c.fetch_timeout,
                )
                if sd is not None:
                    self.model.load_state_dict(sd)
                    return True
        return False

    def _adopt_final_aggregate(self, rounds: int) -> None:
        live = self.discovery.live_peers()
        self._adopt_aggregate([p.peer_id for p in live], {p.peer_id: p.grpc_address for p in live}, rounds - 1)

    def _distill_round(self, r: int, rounds: int):
        """Logit exchange: train locally, publish this round's logits on the proxy rows we
        speak for, then distill from the neighbours' logits of the same round (the order
        is measured in node/sim.py)."""
        stats = self._train(r, rounds)
        if self.stop_requested.is_set():
            return stats, []
        payload = distill.logits_payload(self.model, self.proxy_x, self.proxy_rows)
        self._publish(SnapshotKey("logits", r, 0), payload, samples_per_second=round(stats.samples_per_second, 3))
        return stats, self._distill_from_neighbours(r)

    def _distill_from_neighbours(self, r: int) -> list[str]:
        """Fetch the neighbours' round r logits, fuse them per proxy row (EdgeFD: only the
        rows each teacher speaks for; KnFu: similarity weights) and take the distillation
        steps. Returns the teachers used."""
        cfg, me = self.cfg, self.identity.peer_id
        live = self.discovery.live_peers()
        self._set_peers(len(live))
        nbrs = neighbours([p.peer_id for p in live], me, cfg.comm.topology, r, cfg.train.seed, cfg.comm.random_degree)
        addr = {p.peer_id: p.grpc_address for p in live}
        n_proxy = len(self.proxy_x)
        teachers = self._fetch_all(
            nbrs, addr, SnapshotKey("logits", r, 0), lambda t: distill.check_logits(t, n_proxy, self.num_classes)
        )
        if not teachers:
            return []
        d = cfg.distill
        if distill.uses_knfu(d.method):
            self.model.eval()
            with torch.no_grad():
                own = self.model(self.proxy_x)
            weights = distill.knfu_weights(own, {j: t[1] for j, t in teachers.items()}, d.knfu_beta)
        else:
            weights = {j: 1.0 for j in teachers}
        targets, covered = distill.fused_targets(n_proxy, self.num_classes, teachers, weights, d.temperature)
        gen = torch.Generator().manual_seed(cfg.train.seed * 31 + r * 7 + cfg.node_index)
        loss = distill.distill_steps(
            self.model,
            self.distill_opt,
            self.proxy_x,
            targets,
            covered,
            d.steps,
            cfg.optim.batch_size,
            d.temperature,
            gen,
        )
        if loss is not None:
            self.metrics.distill_loss.set(loss)
        return sorted(teachers)

    def _gossip(self, r: int, q: int, samples_per_second: float) -> list[str]:
        """Gossip step q of round r: publish, fetch the neighbours' (r, q), mix in place.
        Returns the neighbours that were mixed."""
        own = self.model.state_dict()
        self._publish(
            SnapshotKey("model", r, q), self._published(own, r, q), samples_per_second=round(samples_per_second, 3)
        )
        live = self.discovery.live_peers()
        self._set_peers(len(live))
        ids = [p.peer_id for p in live]
        me = self.identity.peer_id
        kind, seed, k = self.cfg.comm.topology, self.cfg.train.seed, self.cfg.comm.random_degree
        nbrs = neighbours(ids, me, kind, r, seed, k, step=q)  # random graphs are re-drawn every gossip step
        if not nbrs:
            return []
        addr = {p.peer_id: p.grpc_address for p in live}
        self_w, w = metropolis_hastings(
            degree(ids, me, kind, r, seed, k, step=q), {j: degree(ids, j, kind, r, seed, k, step=q) for j in nbrs}
        )
        answered = self._fetch_all(nbrs, addr, SnapshotKey("model", r, q), _model_like(own))
        self_w, w = renormalise(self_w, w, set(answered))
        if not answered:
            return []
        ref = self._round_start if q == 0 and self._round_start is not None else own
        mixed, signals, outcome = self.defence.step(
            r, ref, own, answered, self_w, w, self.cfg.comm.mix_variance_correction
        )
        for reason in outcome.discarded.values():
            self.metrics.updates_discarded.labels(reason=reason).inc()
        tracker = self.defence.tracker
        was_flagged = {j for j, s in self._trust_view[0].items() if s.flagged}
        for j, s in sorted(signals.items()):
            log.debug(
                "round %d.%d peer %s: trust %.3f score %.3f norm_ratio %.2f cos %.2f history %.2f",
                r,
                q,
                j[-8:],
                s.trust,
                s.score,
                s.norm_ratio,
                s.cos_consensus,
                s.cos_history,
            )
            if s.flagged and j not in was_flagged:
                log.warning(
                    "peer %s flagged in round %d: trust %.2f, %s",
                    j,
                    r,
                    s.trust,
                    "suspected sybil" if s.sybil else f"norm ratio {s.norm_ratio:.1f}, cosine {s.cos_consensus:.2f}",
                )
        tracker.forget(set(ids))
        self._trust_view = (dict(tracker.signals), tracker.sybil_clusters())
        if self.attack is not None:
            self._honest_seen = [flatten(sd) for sd in answered.values()]
            if not self.attack.mixes:
                return []
        self.model.load_state_dict(mixed)
        return sorted(answered)

    def _publish(self, key: SnapshotKey, tensors: dict, **record) -> None:
        """Serve `tensors` as `key` and sign its digest (with every other held one's) into our
        record: peers refuse snapshots whose digest we have not signed."""
        packed = self.store.publish(key, tensors)
        self.discovery.update(
            round=key.round, step=key.step, model_digest=packed.hexdigest, snapshots=self.store.index(), **record
        )

    def _published(self, own: dict, r: int, q: int) -> dict:
        """What this node publishes: its model, or, for an attacking node, the attack's forgery."""
        if self.attack is None:
            return own
        base = flatten(self._round_start if q == 0 and self._round_start is not None else own)
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + r * 1009 + q * 31 + self.cfg.node_index)
        vec = self.attack.craft(
            base, flatten(own), self.init_vector, self._honest_seen, n=len(self._honest_seen) + 2, f=1, gen=gen
        )
        return unflatten(vec, own)

    def _fetch_all(self, peers: list[str], addr: dict[str, str], key: SnapshotKey, accept: Accept) -> dict[str, Any]:
        """`key` snapshots of `peers`, fetched in parallel under one deadline and passed through
        `accept`; those that answered in time and were accepted. Neighbours backed off as
        unreachable (node/comm/backoff.py) are skipped without waiting."""
        with self._lock:
            skipped = [j for j in peers if self.backoff.skip(j, key.round)]
        for _ in skipped:
            self.metrics.fetch_failures.labels(reason="backed_off").inc()
        peers = [j for j in peers if j not in skipped]
        if not peers:
            return {}
        deadline = time.monotonic() + self.cfg.comm.fetch_timeout
        with ThreadPoolExecutor(max_workers=min(32, len(peers)), thread_name_prefix="atoll-fetch") as pool:
            got = dict(zip(peers, pool.map(lambda j: self._fetch_round(j, addr[j], key, accept, deadline), peers)))
        return {j: v for j, v in got.items() if v is not None}

    def _fetch_round(self, peer_id: str, address: str, key: SnapshotKey, accept: Accept, deadline: float) -> Any:
        """accept(the neighbour's snapshot `key`), or None (reason counted) if not had by the
        deadline or refused. `accept` raises a ReasonedError for content that must not be used."""
        r, q = key.round, key.step
        client = self._client(address)
        reason, answered = "timeout", False
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            remaining = deadline - time.monotonic()
            try:
                envelope, keys = client.health(timeout=min(5.0, remaining))
                answered = True
                rec = open_record(envelope, now=time.time(), expected_peer_id=peer_id)
                if key.kind == "logits" and rec.proxy_digest != self.proxy_digest:
                    reason = "proxy_mismatch"  # logits about another proxy set: meaningless to us
                    break
                if key not in keys:
                    reason = "behind" if (rec.round, rec.step) < (r, q) else "evicted"
                    if (rec.round, rec.step) > (r, q):
                        break  # it moved on and dropped (r, q): nothing to wait for
                    time.sleep(0.05)
                    continue
                t0 = time.perf_counter()
                digest = rec.snapshot_digest(key.kind, r, q)
                if digest is None:  # served but not (yet: the record is re-signed just after) signed
                    reason = "unsigned"
                    time.sleep(0.05)
                    continue
                snap = client.fetch(
                    key, expected_digest=digest, timeout=max(0.1, deadline - time.monotonic()), server_peer_id=peer_id
                )
                self.metrics.fetch_seconds.observe(time.perf_counter() - t0)
                self.metrics.received.inc(snap.nbytes)
                with self._lock:
                    self._received_bytes += snap.nbytes
                    if self.backoff.succeeded(peer_id):
                        log.info("neighbour %s at %s answers again", peer_id[:16], address)
                    self.metrics.peers_backed_off.set(len(self.backoff.backed_off(r)))
                return accept(snap.tensors)
            except RecordRefused as e:
                reason = f"record_{e.reason}"
                break
            except FetchError as e:
                reason = e.reason
                if e.reason in ("timeout", "unavailable", "busy", "not_found", "rate_limited", "denied"):
                    # denied: a peer that joined a moment ago may not have seen our record yet
                    time.sleep(0.1)
                    continue
                break  # bad data: skip this neighbour for this round
            except ReasonedError as e:  # refused by `accept`
                reason = e.reason
                break
        self.metrics.fetch_failures.labels(reason=reason).inc()
        log.info("round %d: skipped neighbour %s (%s)", r, peer_id[:16], reason)
        if not answered and reason in ("timeout", "unavailable") and not self.stop_requested.is_set():
            with self._lock:
                new = self.backoff.failed(peer_id, r)
                self.metrics.peers_backed_off.set(len(self.backoff.backed_off(r + 1)))
            if new:
                log.warning(
                    "neighbour %s at %s is unreachable (%s): skipped without waiting from now on, "
                    "retried after 1, 2, 4, ... rounds (atoll_peers_backed_off)",
                    peer_id[:16],
                    address,
                    reason,
                )
        return None

    def _set_peers(self, n: int) -> None:
        self._peers_live = n
        self.metrics.peers_live.set(n)

    def _peer_at(self, address: str) -> str | None:
        """The peer id whose signed record the node at `address` serves, or None (no answer)."""
        try:
            with SwarmClient(address, timeout=5.0, retries=0, tls=self.tls) as c:
                envelope, _ = c.health(timeout=3.0)
            return open_record(envelope, now=None).peer_id
        except (FetchError, RecordRefused):
            return None

    def _check_reachability(self, ask: int = 3) -> None:
        """Ask up to `ask` live peers to dial this node back at its advertised address (the
        Reach RPC; petals' reachability check does the same), once some are live (waits at
        most comm.join_timeout), and say what they found: neighbours that cannot reach a node
        skip it, so its training is lost to the swarm."""
        deadline = time.monotonic() + self.cfg.comm.join_timeout
        while not self.stop_requested.is_set() and time.monotonic() < deadline:
            try:
                peers = self.discovery.live_peers(include_self=False)[:ask]
            except DiscoveryError:
                return
            if peers:
                break
            self.stop_requested.wait(1.0)
        else:
            return
        verdicts = []
        for p in peers:
            try:
                with SwarmClient(p.grpc_address, timeout=15.0, retries=0, tls=self.tls, identity=self.identity) as c:
                    verdicts.append(c.reach(p.peer_id, timeout=10.0))
            except FetchError:
                continue  # that peer could not be asked: no verdict either way
        if any(v.reachable for v in verdicts):
            self.metrics.reachable.set(1)
            log.info(
                "reachable at %s (checked by %d of %d peers asked)",
                self.advertised,
                sum(v.reachable for v in verdicts),
                len(peers),
            )
        elif verdicts:
            self.metrics.reachable.set(0)
            log.warning(
                "%d peer(s) could not reach this node at %s (%s): they will skip it and its training is "
                "lost to the swarm; set net.advertise_host to an address they can reach, or forward the "
                "port",
                len(verdicts),
                self.advertised,
                verdicts[0].detail or "no answer",
            )

    def _check_own_address(self) -> None:
        """Warn when the address this node advertises does not answer even from here (a wrong
        net.advertise_host, or an interface that is not this machine's): neighbours would then
        wait out their fetch timeout for it. Passing says nothing about NAT or firewalls on the
        way from other machines."""
        try:
            with SwarmClient(self.advertised, timeout=5.0, retries=0, tls=self.tls) as own:
                own.health(timeout=3.0)
        except FetchError as e:
            log.warning(
                "this node's advertised address %s does not answer (%s): neighbours cannot fetch from "
                "it; set net.advertise_host to an address of this machine that they can reach",
                self.advertised,
                e.reason,
            )

    def _check_key_in_use(self, running: bool = False) -> None:
        """Refuse to run (KeyInUse) when another live process serves this node's peer id: two
        processes with one key would overwrite each other's record and split the swarm. At start
        the newcomer refuses; two that find each other while running agree without talking
        that the one with the larger address stops. The other record may also be this node's
        own from before a restart: then its address no longer answers with this id."""
        other = self.discovery.foreign_self()
        if (
            other is None
            or other.grpc_address == self.advertised
            or (running and self.advertised < other.grpc_address)
        ):
            return
        if self._peer_at(other.grpc_address) == self.identity.peer_id:
            raise KeyInUse(
                f"this node's key {self.cfg.net.identity_path} (peer id {self.identity.peer_id[:20]}...) is "
                f"already in use by a live node at {other.grpc_address}: stop that one, or give this "
                f"one its own key (--identity)"
            )
        log.info(
            "a record of this peer id from an earlier run (%s) is still in the DHT; it will expire", other.grpc_address
        )

    def _client(self, address: str) -> SwarmClient:
        if address not in self._clients:
            self._clients[address] = SwarmClient(
                address, timeout=self.cfg.comm.fetch_timeout, retries=1, tls=self.tls, identity=self.identity
            )
        return self._clients[address]

    def _observe(self, r, loss, accuracy, sps, mixed_with) -> None:
        m = self.metrics
        m.round.set(r)
        m.loss.set(loss)
        m.accuracy.set(accuracy)
        m.samples_per_second.set(sps)
        m.neighbours_mixed.set(len(mixed_with))

    def _checkpoint(self, next_round: int, accuracy: float | None) -> None:
        if not self._all_finite():  # never over a good checkpoint (the round loop rolls back first)
            log.warning("not checkpointing round %d: the model is not finite", next_round)
            return
        optim_t, optim_meta = optimizer_tensors(self.optimizer)
        now = time.time()
        checkpoint.save(
            self.ckpt_dir,
            self.model.state_dict(),
            optim_t,
            dict(
                round=next_round,
                peer_id=self.identity.peer_id,
                node_index=self.cfg.node_index,
                node_count=self.cfg.node_count,
                optimizer=self.cfg.optim.name,
                model=f"{self.cfg.model.family}/{self.cfg.model.width}",
                accuracy=accuracy,
                time=now,
                optim=optim_meta,
            ),
        )
        self.metrics.checkpoint_time = now

    def _finish(self, rounds: int) -> None:
        """After the last round: publish the final model (record round = R), optionally run the
        final all-reduce merge once every live peer is done (record round = R + 1 after it), and
        keep serving until every live peer has got as far (bounded), so nobody waits on us."""
        self._publish(SnapshotKey("model", rounds), self.model.state_dict())
        last = rounds
        if self.merger is not None:
            last = rounds + 1
            self._wait_all_at(rounds, self.cfg.comm.merge_timeout)
            alone = not self.discovery.live_peers(include_self=False)
            if alone:
                log.info("final merge skipped: no other live node")
            result = None if alone else self.merger.run(self.model.state_dict())
            self.merged_with = 1 if alone else len(result[1]) if result is not None else 0
            self.metrics.merge_peers.set(self.merged_with)
            if result is not None:
                merged, group = result
                canonical = group[0]  # everyone adopts this member's copy: bit-identical models
                if canonical != self.identity.peer_id:
                    merged = self._adopt_canonical(canonical, last, merged)
                self.model.load_state_dict(merged)
            self._publish(SnapshotKey("model", last), self.model.state_dict())
            self._checkpoint(rounds, None)
        self._wait_all_at(last, self.cfg.comm.fetch_timeout + 2 * self.cfg.net.record_ttl)

    def _adopt_canonical(self, canonical: str, round_: int, mine: dict) -> dict:
        """Fetch the canonical member's merged model; adopt it if it is the same merge as ours
        up to float rounding, else keep ours (and count why)."""
        from node.merge import same_merge

        addr = {p.peer_id: p.grpc_address for p in self.discovery.live_peers()}.get(canonical)
        if addr is None:
            self.metrics.fetch_failures.labels(reason="merge_canonical_gone").inc()
            return mine
        deadline = time.monotonic() + self.cfg.comm.fetch_timeout
        theirs = self._fetch_round(canonical, addr, SnapshotKey("model", round_, 0), _model_like(mine), deadline)
        if theirs is None:
            return mine
        if not same_merge(mine, theirs):
            self.metrics.fetch_failures.labels(reason="merge_mismatch").inc()
            log.warning("canonical merged model of %s differs from ours beyond rounding; keeping ours", canonical[:16])
            return mine
        return {k: theirs[k].to(device=v.device, dtype=v.dtype) for k, v in mine.items()}

    def _wait_all_at(self, round_: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            if all(p.round >= round_ for p in self.discovery.live_peers()):
                return
            time.sleep(0.2)

    def _teardown(self) -> None:
        for c in self._clients.values():
            c.close()
        if self.server is not None:
            self.server.stop(0.5)
        if getattr(self, "merger", None) is not None:
            self.merger.close()
        if self.discovery is not None:
            self.discovery.close()
        self.metrics.close()


def _device_label(dev: torch.device) -> str:
    return dev.type if dev.index is None or dev.type != "cuda" else f"cuda:{dev.index}"


Accept = Callable[[dict], Any]


def _model_like(own: dict) -> Accept:
    """Accept a received state dict only if it has our model's names, shapes and dtypes."""

    def accept(theirs: dict) -> dict:
        if set(theirs) != set(own) or any(
            theirs[k].shape != own[k].shape or theirs[k].dtype != own[k].dtype for k in own
        ):
            raise ReasonedError("incompatible", "snapshot does not fit this model")
        return theirs

    return accept

"""N virtual nodes in one process, running the same algorithm functions as the daemons.

The simulator steps every node through the same round as the daemon does (local training,
then the round's gossip steps over the round's graph, Metropolis-Hastings weights
renormalised over the neighbours that answered), with an in-memory transport. Bytes are
counted exactly as on the wire: a published model is encoded with `p2pd.tensors.encode` (the
daemon's own code path) and every fetch adds its `wire_bytes`, so sim and daemons report the
same figure for the same exchange.

Methods (`method`):
- ``gossip``: decentralized SGD with the configured schedule (constant budget = D-PSGD or
  MGS, late-concentrated budget) and optionally one final exact global merge;
- ``fedavg``: a server averages all responsive nodes' models every round (weighted by data
  size) and sends the average back: 2 model transfers per node per round;
- ``centralized``: one model trained on all the data (the same steps per round as a node);
- ``modest``: per round a deterministic sample of `sample_size` trainers and
  `aggregators` aggregators; trainers pull the model from the previous round's aggregators,
  train, and the aggregators average what the trainers send. Unresponsive sampled nodes are
  skipped, so the round goes on as long as anyone answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from node import distill
from node.aggregate import mean, variance_corrected_mean
from node.comm import modest, seeded_rng
from node.comm.mixing import metropolis_hastings, mix, renormalise
from node.comm.schedule import allotment
from node.comm.topology import graph
from node.data import load_dataset, partition
from node.models import build_model
from node.security import Attack, flip_labels
from node.train import LocalTrainer, evaluate, make_optimizer, round_lr, set_lr
from p2pd.tensors import SnapshotKey, encode

METHODS = ("gossip", "fedavg", "centralized", "modest", "isolated", "edgefd", "knfu", "edgefd+knfu")
DISTILL = distill.METHODS


@dataclass
class SimConfig:
    method: str = "gossip"
    nodes: int = 16
    rounds: int = 20
    local_steps: int = 10
    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.1
    model: str = "mlp"
    width: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    lr_schedule: str = "constant"
    sam_rho: float = 0.0
    topology: str = "ring"
    schedule: str = "constant"  # gossip budget over rounds
    gossip_budget: int | None = None  # total gossip steps; default 1 per round
    late_shape: float = 3.0
    final_merge: bool = False
    merge: str = "mean"  # final merge: mean or variance_corrected
    mix_variance_correction: bool = False  # variance-corrected gossip averaging at every step
    shared_init: bool = True
    unresponsive: float = 0.0  # fraction of nodes that do not answer in each round
    speeds: list[float] | None = None  # per-node relative speed: local steps scale with it
    sample_size: int = 4  # modest: trainers per round
    aggregators: int = 2  # modest: aggregators per round
    seed: int = 0
    eval_every: int = 1
    # federated distillation (isolated / edgefd / knfu): per-node "family:width" models, a
    # proxy set taken out of the training split, and distillation steps per round
    architectures: list[str] | None = None
    proxy_size: int = 300
    distill_steps: int = 20
    temperature: float = 1.0
    knfu_beta: float = 10.0
    # byzantine runs: `byzantine` malicious nodes join the `nodes` honest ones and publish
    # `attack` (node/security/attacks.py); honest nodes aggregate with `aggregator`
    # (node/aggregate/robust.py) and score their neighbours (node/security/trust.py)
    aggregator: str = "mean"
    byzantine: int = 0
    attack: str | None = None
    attack_params: dict = field(default_factory=dict)
    byzantine_fraction: float = 0.25  # f the robust aggregators assume, as a fraction of their inputs
    history_gossip: float = 0.5  # sybilwall: chance per round and neighbour to share update histories
    track_trust: bool = False  # score neighbours (and so run the byzantine round) even with no attack


@dataclass
class RoundLog:
    round: int
    accuracy_mean: float
    accuracy_min: float
    accuracy_max: float
    bytes_sent: int  # cumulative
    seconds: float  # cumulative wall time of the simulation


@dataclass
class SimResult:
    config: SimConfig
    log: list[RoundLog] = field(default_factory=list)
    final_accuracies: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    detection: dict | None = None  # byzantine runs: flagged vs truly malicious, last round


class Simulation:
    def __init__(self, cfg: SimConfig):
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
        self.cfg = cfg
        self.ds = load_dataset(cfg.dataset, seed=0)
        self.robust = cfg.byzantine > 0 or cfg.aggregator != "mean" or cfg.track_trust
        if self.robust and cfg.method != "gossip":
            raise ValueError("byzantine runs and robust aggregators need method gossip")
        if cfg.byzantine and not cfg.attack:
            raise ValueError("byzantine nodes need an attack")
        total = cfg.nodes + cfg.byzantine
        self.ids = [f"n{i:04d}" for i in range(total)]
        self.honest = list(range(cfg.nodes))
        n_models = 1 if cfg.method == "centralized" else total
        labels = self.ds.y_train.numpy()
        pool = np.arange(len(labels))
        if cfg.method in DISTILL + ("isolated",):
            from node.distill import proxy_split

            self.proxy_idx, self.proxy_digest = proxy_split(len(labels), cfg.proxy_size, cfg.seed, cfg.dataset)
            pool = np.setdiff1d(pool, self.proxy_idx)  # the proxy is nobody's labelled data
            self.proxy_x = self.ds.x_train[torch.from_numpy(self.proxy_idx)]
        if cfg.method == "centralized":
            self.parts = [np.arange(len(self.ds.y_train))]
        else:
            # many virtual nodes on a small data set: each still needs a few samples
            min_size = max(1, min(10, len(self.ds.y_train) // (2 * cfg.nodes)))
            self.parts = [
                pool[p]
                for p in partition(
                    labels[pool], total, cfg.partition, alpha=cfg.alpha, seed=cfg.seed, min_size=min_size
                )
            ]
        self.models, self.opts, self.trainers = [], [], []
        self.attack = Attack(cfg.attack, **cfg.attack_params) if cfg.attack else None
        for i in range(n_models):
            init_seed = cfg.seed if cfg.shared_init else cfg.seed * 100_003 + i
            family, width = cfg.model, cfg.width
            if cfg.architectures:
                family, w = cfg.architectures[i % len(cfg.architectures)].split(":")
                width = int(w)
            m = build_model(family, self.ds.input_shape, self.ds.num_classes, width, init_seed)
            o = make_optimizer(m, "sgd", cfg.lr, cfg.momentum, 0.0)
            idx = torch.from_numpy(self.parts[i])
            y = self.ds.y_train[idx]
            if i >= cfg.nodes and self.attack.flips_labels:
                y = flip_labels(y, self.ds.num_classes)
            self.models.append(m)
            self.opts.append(o)
            self.trainers.append(
                LocalTrainer(
                    m, o, self.ds.x_train[idx], y, cfg.batch_size, seed=cfg.seed * 7919 + i, sam_rho=cfg.sam_rho
                )
            )
        # distillation has its own momentum-free optimizer (see node.distill.kd.distill_steps)
        self.distill_opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr) for m in self.models]
        self.sizes = [len(p) for p in self.parts]
        self.bytes_sent = 0
        self._wire_cache: dict[tuple, int] = {}
        budget = cfg.gossip_budget if cfg.gossip_budget is not None else cfg.rounds
        self.steps = allotment(cfg.schedule, cfg.rounds, budget, cfg.late_shape)
        if self.robust:
            from node.aggregate.vectors import flatten
            from node.security.defence import Defence

            self.defences = {
                i: Defence(
                    cfg.aggregator,
                    self.models[i],
                    self.trainers[i].x,
                    self.trainers[i].y,
                    self.ds.num_classes,
                    cfg.byzantine_fraction,
                    seed=cfg.seed * 7919 + i,
                )
                for i in self.honest
            }
            self.init_vec = flatten(self.models[0].state_dict())
            self.signals: dict[int, dict] = {}

    # -- transport accounting --------------------------------------------------------------
    def wire_bytes(self, state: dict, round_: int, step: int, kind: str = "model") -> int:
        """Bytes one fetch of `state` puts on the wire, from the daemon's own encoder.

        The size depends only on the key and the tensors' names, dtypes and shapes (payloads
        have fixed lengths, the digest is 32 bytes), so it is encoded once per layout and key
        rather than once per node and step."""
        layout = (kind, round_, step, tuple((k, v.dtype, tuple(v.shape)) for k, v in sorted(state.items())))
        if layout not in self._wire_cache:
            self._wire_cache[layout] = encode(state, SnapshotKey(kind, round_, step).to_pb()).wire_bytes
        return self._wire_cache[layout]

    def _state(self, i: int) -> dict:
        return self.models[i].state_dict()  # already detached tensors

    # -- rounds ----------------------------------------------------------------------------
    def responsive(self, round_: int) -> list[int]:
        cfg = self.cfg
        k = int(round(cfg.unresponsive * cfg.nodes))
        down = set(seeded_rng("down", cfg.seed, round_).sample(range(cfg.nodes), k)) if k else set()
        return [i for i in range(len(self.models)) if i not in down]

    def _train(self, i: int, round_: int) -> None:
        cfg = self.cfg
        set_lr(self.opts[i], round_lr(cfg.lr, cfg.lr_schedule, round_, cfg.rounds))
        speed = cfg.speeds[i] if cfg.speeds else 1.0
        self.trainers[i].train_round(round_, steps=max(1, int(round(cfg.local_steps * speed))))

    def _gossip_step(self, round_: int, step: int, alive: list[int]) -> None:
        """One gossip step; with mixed architectures, models only mix within their own
        architecture (each group gossips on its own graph)."""
        archs = self.cfg.architectures
        if archs and len(set(archs)) > 1:
            for a in sorted(set(archs)):
                self._gossip_group(round_, step, [i for i in alive if archs[i % len(archs)] == a])
        else:
            self._gossip_group(round_, step, alive)

    def _gossip_group(self, round_: int, step: int, alive: list[int]) -> None:
        cfg = self.cfg
        ids = [self.ids[i] for i in alive]
        g = graph(ids, cfg.topology, round_, cfg.seed, step=step)
        states = {self.ids[i]: self._state(i) for i in alive}
        sizes = {p: self.wire_bytes(states[p], round_, step) for p in ids}
        new = {}
        for i in alive:
            me = self.ids[i]
            nb = sorted(g[me])
            self_w, w = metropolis_hastings(len(g[me]), {j: len(g[j]) for j in nb})
            self_w, w = renormalise(self_w, w, set(nb))
            new[i] = mix(
                states[me], {j: states[j] for j in nb}, self_w, w, correct_variance=cfg.mix_variance_correction
            )
            self.bytes_sent += sum(sizes[j] for j in nb)
        for i, sd in new.items():
            self.models[i].load_state_dict(sd)

    def _global_average(self, members: list[int], round_: int, how: str = "mean", weights=None) -> dict:
        states = [self._state(i) for i in members]
        return (
            variance_corrected_mean(states, weights=weights) if how == "variance_corrected" else mean(states, weights)
        )

    def run_round(self, r: int) -> None:
        cfg = self.cfg
        if cfg.method == "centralized":
            self._train(0, r)
            return
        alive = self.responsive(r)
        if self.robust:
            self._robust_round(r, alive)
            return
        if cfg.method in DISTILL + ("isolated",):
            self._distill_round(r, alive)
            return
        if cfg.method == "modest":
            self._modest_round(r, alive)
            return
        for i in alive:
            self._train(i, r)
        if cfg.method == "fedavg":
            avg = self._global_average(alive, r, weights=[self.sizes[i] for i in alive])
            size = self.wire_bytes(avg, r, 0)
            self.bytes_sent += 2 * size * len(alive)  # every node uploads, the server sends back
            for i in alive:
                self.models[i].load_state_dict(avg)
            return
        for q in range(self.steps[r]):
            self._gossip_step(r, q, alive)
        if cfg.final_merge and r == cfg.rounds - 1:
            avg = self._global_average(alive, r, cfg.merge)
            # a ring all-reduce sends 2 (n - 1) / n model sizes per node
            n = len(alive)
            self.bytes_sent += int(2 * (n - 1) / n * self.wire_bytes(avg, r, 0)) * n
            for i in alive:
                self.models[i].load_state_dict(avg)

    def _distill_round(self, r: int, alive: list[int]) -> None:
        """Train locally, publish logits on the proxy set, distill from the neighbours' logits
        of the same round (as a gossip round publishes and mixes). Distilling last keeps what
        the neighbours taught: with FedMD's order (digest, then train) the local steps on a
        node's few classes erased it again (EdgeFD 79/84/90% vs 88/92/92% per architecture,
        8 nodes, alpha 0.1, complete graph)."""
        for i in alive:
            self._train(i, r)
        if self.cfg.method != "isolated":
            self._distill(r, alive)

    def _distill(self, r: int, alive: list[int]) -> None:
        from node.distill import (
            distill_steps,
            fused_targets,
            knfu_weights,
            logits_payload,
            speaking_rows,
            uses_filter,
            uses_knfu,
        )

        cfg = self.cfg
        n_proxy = len(self.proxy_x)
        if not hasattr(self, "_rows"):  # each node's rows: its EdgeFD filter (computed once) or all
            self._rows = {
                i: speaking_rows(uses_filter(cfg.method), self.trainers[i].x, self.proxy_x, cfg.seed)
                for i in range(cfg.nodes)
            }
        sent = {i: logits_payload(self.models[i], self.proxy_x, self._rows[i]) for i in alive}
        g = graph([self.ids[i] for i in alive], cfg.topology, r, cfg.seed)
        index = {self.ids[i]: i for i in alive}
        for i in alive:
            nb = [index[p] for p in sorted(g[self.ids[i]])]
            if not nb:
                continue
            self.bytes_sent += sum(self.wire_bytes(sent[j], r, 0, kind="logits") for j in nb)
            teachers = {str(j): (torch.from_numpy(self._rows[j]), sent[j]["logits"].float()) for j in nb}
            if uses_knfu(cfg.method):
                with torch.no_grad():
                    self.models[i].eval()
                    own = self.models[i](self.proxy_x)
                weights = knfu_weights(own, {n: t[1] for n, t in teachers.items()}, cfg.knfu_beta)
            else:
                weights = {n: 1.0 for n in teachers}
            targets, covered = fused_targets(n_proxy, self.ds.num_classes, teachers, weights, cfg.temperature)
            gen = torch.Generator().manual_seed(cfg.seed * 31 + r * 7 + i)
            distill_steps(
                self.models[i],
                self.distill_opts[i],
                self.proxy_x,
                targets,
                covered,
                cfg.distill_steps,
                cfg.batch_size,
                cfg.temperature,
                gen,
            )

    def _robust_round(self, r: int, alive: list[int]) -> None:
        """One gossip step per round with byzantine publishers and each honest node's Defence."""
        from node.aggregate.sybilwall import gossip_partners, merge_heard
        from node.aggregate.vectors import flatten, unflatten

        cfg = self.cfg
        honest = [i for i in alive if i < cfg.nodes]
        refs = {i: {k: v.clone() for k, v in self._state(i).items()} for i in honest}
        for i in honest:
            self._train(i, r)
        published = {self.ids[i]: self._state(i) for i in honest}
        honest_vecs = [flatten(published[self.ids[i]]) for i in honest]
        consensus = torch.stack([flatten(refs[i]) for i in honest]).mean(0) if honest else self.init_vec
        byz = [i for i in alive if i >= cfg.nodes]
        sybil_vec = None
        for b in byz:
            atk = self.attack
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + r * 1009 + b)
            template = self.models[b].state_dict()
            if atk.name == "sybil":
                if sybil_vec is None:  # one attacker: every identity publishes the first member's model
                    self._train(cfg.nodes, r)
                    sybil_vec = flatten(self._state(cfg.nodes))
                trained, base = sybil_vec, sybil_vec
            else:
                base = consensus  # an omniscient attacker starts each round from the swarm's consensus
                self.models[b].load_state_dict(unflatten(base, template))
                if atk.trains:
                    self._train(b, r)
                trained = flatten(self._state(b))
            vec = atk.craft(base, trained, self.init_vec, honest_vecs, n=len(alive), f=len(byz), gen=gen)
            published[self.ids[b]] = unflatten(vec, template)
        ids = [self.ids[i] for i in alive]
        g = graph(ids, cfg.topology, r, cfg.seed)
        new = {}
        for i in honest:
            me = self.ids[i]
            nb = sorted(g[me])
            self_w, w = metropolis_hastings(len(g[me]), {j: len(g[j]) for j in nb})
            sd, signals, _ = self.defences[i].step(
                r, refs[i], published[me], {j: published[j] for j in nb}, self_w, w, cfg.mix_variance_correction
            )
            new[i] = sd
            self.signals[i] = signals
            self.bytes_sent += sum(self.wire_bytes(published[j], r, 0) for j in nb)
        for i, sd in new.items():
            self.models[i].load_state_dict(sd)
        if cfg.aggregator == "sybilwall" and cfg.history_gossip > 0:  # probabilistic gossip of histories
            rng = seeded_rng("histories", cfg.seed, r)
            for i in honest:
                me = self.ids[i]
                for j in gossip_partners(
                    me, sorted(p for p in g[me] if int(p[1:]) < cfg.nodes), cfg.history_gossip, rng
                ):
                    other = self.defences[int(j[1:])].tracker
                    merge_heard(other.heard, other.histories, self.defences[i].tracker.histories, j)

    def detection(self) -> dict:
        """Precision and recall of the honest nodes' last flags (pairs observer -> neighbour)."""
        tp = fp = fn = 0
        for signals in self.signals.values():
            for j, s in signals.items():
                bad = int(j[1:]) >= self.cfg.nodes
                tp += s.flagged and bad
                fp += s.flagged and not bad
                fn += (not s.flagged) and bad
        return dict(
            precision=tp / (tp + fp) if tp + fp else None,
            recall=tp / (tp + fn) if tp + fn else None,
            flagged=tp + fp,
            malicious_pairs=tp + fn,
        )

    def _modest_round(self, r: int, alive: list[int]) -> None:
        cfg = self.cfg
        index = {p: i for i, p in enumerate(self.ids)}  # the daemons' sampling, over the same ids
        sampled = modest.sample(self.ids, r, cfg.seed, cfg.sample_size, cfg.aggregators)
        trainers, aggregators = ([index[p] for p in group] for group in sampled)
        alive_set = set(alive)
        if not hasattr(self, "_modest_model"):  # a copy: node 0 may train this round and move its own
            self._modest_model = {k: v.clone() for k, v in self._state(0).items()}
        start = self._modest_model
        size = self.wire_bytes(start, r, 0)
        sent_back = []
        for i in trainers:
            if i not in alive_set:
                continue  # unresponsive this round: skipped, nobody waits
            self.bytes_sent += size  # trainer pulls the current model from a live aggregator
            self.models[i].load_state_dict(start)
            self._train(i, r)
            sent_back.append(i)
        live_aggs = [a for a in aggregators if a in alive_set]
        if sent_back and live_aggs:
            self.bytes_sent += size * len(sent_back) * len(live_aggs)  # each trainer sends to every aggregator
            self._modest_model = self._global_average(sent_back, r, weights=[self.sizes[i] for i in sent_back])
        # every node's "model" for evaluation is the swarm's current model
        for i in range(cfg.nodes):
            self.models[i].load_state_dict(self._modest_model)

    def accuracies(self) -> list[float]:
        models = (
            self.models[:1] if self.cfg.method == "modest" else self.models[: len(self.models) - self.cfg.byzantine]
        )
        return [evaluate(m, self.ds.x_test, self.ds.y_test) for m in models]

    def run(self, progress=None) -> SimResult:
        res = SimResult(self.cfg)
        t0 = time.perf_counter()
        for r in range(self.cfg.rounds):
            self.run_round(r)
            if (r + 1) % self.cfg.eval_every == 0 or r == self.cfg.rounds - 1:
                accs = self.accuracies()
                res.log.append(
                    RoundLog(
                        r + 1, float(np.mean(accs)), min(accs), max(accs), self.bytes_sent, time.perf_counter() - t0
                    )
                )
                if progress:
                    progress(res.log[-1])
        res.final_accuracies = self.accuracies()
        res.bytes_sent = self.bytes_sent
        if self.robust:
            res.detection = self.detection()
        res.seconds = time.perf_counter() - t0
        return res

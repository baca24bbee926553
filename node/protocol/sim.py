"""N virtual nodes in one process, running exactly the daemons' round engine.

A simulation is a `SwarmConfig` (the same file `atoll swarm up` starts real daemons from):
every virtual node gets its `NodeConfig` from it, builds the same `Worker` and the same
`Engine` as a daemon, and talks to the others through the in-memory exchange
(node/protocol/exchange/memory.py), which counts the daemons' wire bytes and injects faults
deterministically. The simulator only decides how many nodes, their peer ids and the faults.

Each virtual node is a thread; torch runs one intra-op thread per process here, so the nodes
(not the ops) use the cores, and results do not depend on how many cores there are.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from node.algo.comm.links import Compute, Idle
from node.config import SwarmConfig
from node.protocol import rehearsal
from node.protocol.engine import Engine
from node.protocol.exchange.memory import Board, Crashed, Faults, MemoryExchange
from node.protocol.worker import Diverged, Worker
from p2pd.tensors import pack


@dataclass
class RoundLog:
    """Accuracy over the honest nodes after round `round` (1-based), bytes sent for rounds
    1..`round` by all nodes, and wall seconds since the start."""

    round: int
    accuracy_mean: float
    accuracy_min: float
    accuracy_max: float
    bytes_sent: int
    seconds: float


@dataclass
class SimResult:
    """What a simulation measured (see the field comments)."""

    log: list[RoundLog] = field(default_factory=list)
    final_accuracies: list[float] = field(default_factory=list)  # honest nodes that finished, by index
    final_metrics: list[dict] = field(default_factory=list)  # every metric of those nodes (e.g. own_accuracy)
    bytes_sent: int = 0
    seconds: float = 0.0
    detection: dict | None = None  # the honest nodes' last trust flags against the truly malicious
    digests: dict[str, list[str]] = field(default_factory=dict)  # peer -> model digest after each round
    traces: dict[str, list] = field(default_factory=dict)  # peer -> what it did (node/algo/comm/links.py), if asked
    refused: Counter = field(default_factory=Counter)  # fetches that delivered nothing, by reason
    diverged: list[str] = field(default_factory=list)  # nodes that stopped with Diverged (NaN/Inf)


class Simulation:
    """`swarm`: nodes and their configs; `faults`: node.protocol.exchange.memory.Faults; `ids`: the
    virtual peer ids (default n0000, n0001, ...; the graphs depend on their order);
    `eval_every`: rounds between test evaluations; `digests`: record every node's model
    digest after every round; `traces`: record what every node did (local steps, publishes, fetches with their
    wire bytes, all-reduces, gaps between rounds) for the link model, which replays them on given links
    (node/algo/comm/links.py: time, utilization). Raises ConfigError / DatasetMissing like a daemon would."""

    def __init__(
        self,
        swarm: SwarmConfig,
        faults: Faults | None = None,
        ids: list[str] | None = None,
        eval_every: int = 1,
        digests: bool = False,
        traces: bool = False,
    ):
        """`swarm`: the SwarmConfig of every virtual node; `faults`: the fault plan, None for none; `ids`: one distinct
        peer id per node, None for n0000, n0001, ...; `eval_every`: evaluation period in rounds; `digests`: whether to
        record model digests. Builds every Worker and Engine now: raises ValueError when `ids` are not `swarm.nodes`
        distinct ids, and ConfigError, TaskError or DatasetMissing as a Worker does. `traces`: whether to record
        every node's operations (SimResult.traces)."""
        n = swarm.nodes
        self.ids = list(ids) if ids is not None else [f"n{i:04d}" for i in range(n)]
        if len(self.ids) != n or len(set(self.ids)) != n:
            raise ValueError(f"need {n} distinct peer ids, got {self.ids}")
        self.cfgs = [swarm.config_for(i) for i in range(n)]
        self.rounds = self.cfgs[0].train.rounds
        self.eval_every, self.keep_digests = eval_every, digests
        self.workers = [Worker(c) for c in self.cfgs]
        sizes, swarms = [w.dataset_size for w in self.workers], [c.net.swarm for c in self.cfgs]
        self.board = Board(self.ids, sizes, faults, self.cfgs[0].comm.fetch_timeout, swarms)
        if traces:
            self.board.traces = {p: [] for p in self.ids}
            for me, w in zip(self.ids, self.workers):
                _record_steps(w, lambda steps, me=me: self.board.record(me, Compute(steps)))
        self.engines = []
        for i, (c, w) in enumerate(zip(self.cfgs, self.workers)):
            engine = Engine(c, w, MemoryExchange(self.board, self.ids[i]))
            rehearsal.install(engine, self.ids[i])
            self.engines.append(engine)
        self.malicious = {self.ids[i] for i, c in enumerate(self.cfgs) if c.security.attack}
        self.accuracy: list[dict[int, float]] = [{} for _ in range(n)]
        self.finished_at: dict[int, float] = {}
        self.merged_with: list[int | None] = [None] * n
        self.digests: dict[str, list[str]] = {p: [] for p in self.ids}
        self.errors: list[BaseException] = []
        self.diverged: list[str] = []

    def run(self) -> SimResult:
        """Run every node to the end (threads), then gather the result. Re-raises the first
        error of a virtual node (other than an injected crash)."""
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        try:
            threads = [threading.Thread(target=self._node, args=(i, t0), daemon=True) for i in range(len(self.ids))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.set_num_threads(threads_before)
        if self.errors:
            raise self.errors[0]
        return self._result(time.perf_counter() - t0)

    def _node(self, i: int, t0: float) -> None:
        engine, me = self.engines[i], self.ids[i]

        def after_round(r: int, _result) -> None:
            if r % self.eval_every == 0 or r == self.rounds:
                self.accuracy[i][r] = self.workers[i].evaluate()
                self.finished_at[r] = time.perf_counter() - t0
            if self.keep_digests:
                self.digests[me].append(pack(self.workers[i].state()).hexdigest)
            self.board.record(me, Idle())  # a daemon evaluates and checkpoints here

        try:
            engine.run(0, after_round)
            self.merged_with[i] = engine.finish()
            if self.keep_digests:
                self.digests[me].append(pack(self.workers[i].state()).hexdigest)
        except Crashed:
            pass
        except Diverged:  # a daemon would exit with an error: the node leaves, and is counted
            self.diverged.append(me)
        except BaseException as e:  # a bug in a virtual node: stop the others, report it
            self.errors.append(e)
            self.board.stop.set()
        finally:
            self.board.finished(me)

    def honest(self) -> list[int]:
        """Indices of the nodes that run no attack."""
        return [i for i, p in enumerate(self.ids) if p not in self.malicious]

    def _result(self, seconds: float) -> SimResult:
        res = SimResult(bytes_sent=self.board.bytes_sent, seconds=seconds, refused=Counter(self.board.refused))
        honest = self.honest()
        rounds = sorted({r for acc in self.accuracy for r in acc})
        last = {i: self.workers[i].evaluate() for i in honest if self.ids[i] in self.diverged}
        for i, acc in last.items():  # a diverged node counts, for the rounds it missed, with its rolled-back model
            self.accuracy[i].update({r: acc for r in rounds if r not in self.accuracy[i]})
        for r in rounds:
            accs = [self.accuracy[i][r] for i in honest if r in self.accuracy[i]]
            if not accs:
                continue
            sent = sum(b for k, b in self.board.by_round.items() if k < r)
            res.log.append(RoundLog(r, statistics.fmean(accs), min(accs), max(accs), sent, self.finished_at[r]))
        # diverged nodes count with the last good model they rolled back to (their checkpoint)
        done = [i for i in honest if self.rounds in self.accuracy[i] or i in last]
        res.final_accuracies = [last[i] if i in last else self.workers[i].evaluate() for i in done]
        res.final_metrics = [dict(self.workers[i].metrics) for i in done]
        res.diverged = sorted(self.diverged)
        res.digests = self.digests if self.keep_digests else {}
        res.traces = self.board.traces or {}
        res.detection = self.detection()
        return res

    def detection(self) -> dict:
        """Precision and recall of the honest nodes' last flags (pairs observer -> neighbour)."""
        tp = fp = fn = 0
        for i in self.honest():
            for j, s in self.workers[i].defence.tracker.signals.items():
                bad = j in self.malicious
                tp += s.flagged and bad
                fp += s.flagged and not bad
                fn += (not s.flagged) and bad
        return dict(
            precision=tp / (tp + fp) if tp + fp else None,
            recall=tp / (tp + fn) if tp + fn else None,
            flagged=tp + fp,
            malicious_pairs=tp + fn,
        )


def _record_steps(worker: Worker, record) -> None:
    """Make `worker.train` call `record(steps)` with the local steps each round (or part of a round) took."""
    train = worker.train

    def recorded(r, stop=lambda: False, **part):
        stats = train(r, stop, **part)
        if stats.steps:
            record(stats.steps)
        return stats

    worker.train = recorded

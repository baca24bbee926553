"""What users would run instead, on the same workers (node/protocol/worker.py) as the simulated swarm:
`centralized` (one model on all the data, the same local steps per round) and `fedavg`
(McMahan et al. 2017: a server averages every node's model each round, weighted by data set
size, and sends the average back: two model transfers per node per round). Neither is a
daemon protocol; they are the references the benchmarks compare against."""

from __future__ import annotations

import time

from node.algo.aggregate import mean
from node.app.bench import BENCH_NODE, merged
from node.config import NodeConfig, SwarmConfig
from node.protocol.sim import RoundLog, SimResult
from node.protocol.worker import Worker
from p2pd.tensors import SnapshotKey, encode


def run(name: str, nodes: int, node: dict, seed: int) -> SimResult:
    """`name`: centralized or fedavg; `node`: nested overrides of BENCH_NODE."""
    tree = merged(merged(BENCH_NODE, node), {"train": {"seed": seed}, "data": {"seed": seed}})
    count = 1 if name == "centralized" else nodes
    swarm = SwarmConfig(nodes=count, node=NodeConfig.model_validate(tree))
    workers = [Worker(swarm.config_for(i)) for i in range(count)]
    rounds = workers[0].cfg.train.rounds
    res, t0, sent = SimResult(), time.perf_counter(), 0
    for r in range(rounds):
        for w in workers:
            w.train(r)
        if name == "fedavg":
            avg = mean([w.state() for w in workers], [w.dataset_size for w in workers])
            sent += 2 * len(workers) * encode(avg, SnapshotKey("model", r).to_pb()).wire_bytes
            for w in workers:
                w.load(avg)
        accs = [w.evaluate() for w in workers]
        res.log.append(RoundLog(r + 1, sum(accs) / len(accs), min(accs), max(accs), sent, time.perf_counter() - t0))
    res.final_accuracies, res.bytes_sent, res.seconds = accs, sent, time.perf_counter() - t0
    res.final_metrics = [dict(w.metrics) for w in workers]
    return res

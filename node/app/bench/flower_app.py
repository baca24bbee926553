"""Flower FedAvg on atoll's workers: the baseline of `atoll bench swarm` (see node/app/bench/swarm.py).

Runs inside the benchmark's own Flower virtual environment (flwr, torch, numpy, pydantic, pyyaml,
blake3), with atoll's source folder on PYTHONPATH; atoll's own environment never gets flwr.

    python -m node.app.bench.flower_app server --address 127.0.0.1:PORT --nodes 4 --rounds 80
    python -m node.app.bench.flower_app client --address 127.0.0.1:PORT --config node0.json

Each client is a `node.protocol.worker.Worker` built from the same NodeConfig an atoll node gets, so
model, init, partition, sampler, optimizer and step-size schedule are atoll's. Flower's default
FedAvg (McMahan et al. 2017) is used as users run it: every client trains every round and the
server averages weighted by examples. A client evaluates the global model it receives, so the
accuracy of round r is known when round r+1's fit arrives; one extra round (no training) delivers
the last model. Clients print atoll's JSON events: `round` (round, the task's metric as `score`, bytes, and
where the client's time went since its first fit: compute_s, comm_s, idle_s, utilization) and `done`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def client(address: str, config_path: str, threads: int) -> None:
    """One Flower client on the worker of the NodeConfig in `config_path` (JSON)."""
    import flwr as fl
    import numpy as np
    import torch

    from node.config import NodeConfig
    from node.protocol.worker import Worker

    torch.set_num_threads(threads)
    with open(config_path) as f:
        cfg = NodeConfig.model_validate(json.load(f))
    worker = Worker(cfg)
    rounds = cfg.train.rounds
    moved = {"received": 0, "sent": 0}
    # where the client's time goes since its first fit, as atoll's events (node/protocol/timing.py): local
    # training, evaluation (idle), and the rest (waiting for the server, sending and receiving: communication)
    spent = {"compute": 0.0, "idle": 0.0, "start": None}
    metric = worker.metric

    def split() -> dict:
        wall = time.perf_counter() - spent["start"] if spent["start"] is not None else 0.0
        comm = max(0.0, wall - spent["compute"] - spent["idle"])
        return dict(
            compute_s=round(spent["compute"], 4),
            comm_s=round(comm, 4),
            idle_s=round(spent["idle"], 4),
            utilization=round(spent["compute"] / wall, 4) if wall > 0 else 0.0,
        )

    def score() -> dict:
        t = time.perf_counter()
        v = round(worker.evaluate(), 5)
        spent["idle"] += time.perf_counter() - t
        return {"metric": metric, "score": v, **({"accuracy": v} if metric == "accuracy" else {})}

    def arrays() -> list[np.ndarray]:
        return [t.detach().cpu().numpy() for t in worker.state().values()]

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            out = arrays()
            moved["sent"] += sum(a.nbytes for a in out)
            return out

        def fit(self, parameters, config):
            r = int(config["round"])  # Flower counts from 1; round r trains atoll's round r-1
            if spent["start"] is None:
                spent["start"] = time.perf_counter()
            moved["received"] += sum(p.nbytes for p in parameters)
            worker.load({k: torch.from_numpy(np.asarray(p)) for k, p in zip(worker.state(), parameters)})
            if r > 1:  # the global model of round r-1
                _emit(
                    event="round",
                    round=r - 1,
                    **score(),
                    sent_bytes=moved["sent"],
                    received_bytes=moved["received"],
                    **split(),
                )
            if r <= rounds:
                spent["compute"] += worker.train(r - 1).seconds
            out = arrays()
            moved["sent"] += sum(a.nbytes for a in out)
            return out, worker.dataset_size, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl.client.start_client(server_address=address, client=Client().to_client(), insecure=True)
    _emit(
        event="done",
        round=rounds,
        **score(),
        sent_bytes=moved["sent"],
        received_bytes=moved["received"],
        **split(),
    )


def server(address: str, nodes: int, rounds: int) -> None:
    """The FedAvg server: `rounds` training rounds plus one that only delivers the last model."""
    import flwr as fl

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        on_fit_config_fn=lambda r: {"round": r},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl.server.start_server(
            server_address=address, config=fl.server.ServerConfig(num_rounds=rounds + 1), strategy=strategy
        )
    _emit(event="done")


def main(argv: list[str]) -> None:
    """Command line: `server` or `client` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="flower_app")
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--config")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.role == "server":
        server(a.address, a.nodes, a.rounds)
    else:
        client(a.address, a.config, a.threads)


if __name__ == "__main__":
    main(sys.argv[1:])

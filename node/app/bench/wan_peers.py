"""Flower FedAvg and torchft's DiLoCo on the same testbed as atoll (node/app/bench/wan.py), for `atoll bench wan`.

Both train atoll's own Worker (same model, init, data partition, sampler and inner optimizer) in environments of
their own (node/app/bench/venvs.py). Node i runs on testbed host i; the coordinator each of them needs runs on a
host of its own, the testbed's last (`coordinator_host`), with a datacenter link: Flower's server, which averages
every round, and torchft's Lighthouse, which forms the quorum (the all-reduce itself runs between the replicas,
over gloo, through their own links). Their clients print atoll's events (flower_app.py, torchft_app.py), read the
same way as atoll's daemons'.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from node.app.bench.swarm import BenchError
from node.app.bench.wan import WanRun, summarize
from node.app.swarm import NodeRun, _drain, spawn
from node.app.testbed.testbed import Testbed
from node.config import SwarmConfig
from node.net.threads import usable_cores
from p2pd.procs import kill_tree

SOURCE = Path(__file__).resolve().parents[3]  # atoll's source folder, on the baselines' PYTHONPATH
COORDINATOR_PORT = 29510


def coordinator_host(bed: Testbed, swarm_cfg: SwarmConfig) -> int:
    """The testbed host of the coordinator: the one after the nodes'. Raises BenchError when there is none."""
    if len(bed.addresses) <= swarm_cfg.nodes:
        raise BenchError(f"the testbed needs {swarm_cfg.nodes + 1} hosts: one per node and one for the coordinator")
    return swarm_cfg.nodes


def _configs(swarm_cfg: SwarmConfig, workdir: Path) -> list[Path]:
    paths = []
    for i in range(swarm_cfg.nodes):
        c = swarm_cfg.config_for(i)
        if c.task is None and c.data.dataset == "digits" and c.data.path is None:
            from node.protocol.data.datasets import digits_file

            c.data.path = digits_file()  # the baselines' environments have no scikit-learn
        path = workdir / f"node{i}.json"
        path.write_text(json.dumps(c.model_dump(mode="json")))
        paths.append(path)
    return paths


def _wait(nodes: list[NodeRun], helpers: list[NodeRun], timeout: float, system: str) -> float:
    """Wait until every node process exited (helpers may stay); returns when the last one did (time.monotonic).
    Raises BenchError when one fails or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while any(n.proc.poll() is None for n in nodes):
        for p in nodes + helpers:
            _drain(p)
            if p.proc.poll() not in (None, 0):
                raise BenchError(f"a {system} process exited with code {p.proc.returncode}; see {p.log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"{system} did not finish within {timeout:.0f} s; see {nodes[0].log_path.parent}")
        time.sleep(0.1)
    t_end = time.monotonic()
    for n in nodes:
        _drain(n)
        if n.proc.returncode != 0 or n.final is None:
            raise BenchError(f"a {system} process exited with code {n.proc.returncode}; see {n.log_path}")
    return t_end


def _run(
    swarm_cfg: SwarmConfig,
    bed: Testbed,
    workdir: Path,
    names: tuple[str, str, str],
    coordinator: list[str],
    node_argv,
    repeat: int,
    target: float | None,
) -> WanRun:
    """One baseline run: `coordinator` (argv) on the coordinator host, node_argv(i, its config path) on host i;
    `names`: (system, method, the coordinator's log name). Everything started is stopped by pid at the end."""
    system, method, log = names
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(SOURCE))
    t0, procs = time.monotonic(), []
    try:
        helper = spawn(bed.exec_argv(bed.host(coordinator_host(bed, swarm_cfg)), coordinator), -1, workdir / log, env)
        procs.append(helper)
        nodes = [
            spawn(bed.exec_argv(bed.host(i), node_argv(i, path)), i, workdir / f"node{i}.log", env)
            for i, path in enumerate(_configs(swarm_cfg, workdir))
        ]
        procs += nodes
        t_end = _wait(nodes, [helper], swarm_cfg.timeout, system)
        lower = nodes[0].final.get("metric", "accuracy") != "accuracy"  # perplexity: lower is better
        return summarize(system, method, repeat, nodes, t0, t_end, target, swarm_cfg, lower)
    finally:
        for p in procs:
            kill_tree(p.proc.pid)


def _threads(swarm_cfg: SwarmConfig) -> str:
    return str(swarm_cfg.node.threads or max(1, usable_cores() // swarm_cfg.nodes))


def run_flower(
    swarm_cfg: SwarmConfig, bed: Testbed, workdir: Path, python: Path, repeat: int, target: float | None
) -> WanRun:
    """Flower FedAvg on the testbed: its server on the coordinator host, client i on host i. Raises BenchError."""
    address = f"{bed.addresses[coordinator_host(bed, swarm_cfg)]}:{COORDINATOR_PORT}"
    app = [str(python), "-m", "node.app.bench.flower_app"]
    server = app + ["server", "--address", address, "--nodes", str(swarm_cfg.nodes)]
    server += ["--rounds", str(swarm_cfg.node.train.rounds)]

    def client(i: int, path: Path) -> list[str]:
        return app + ["client", "--address", address, "--config", str(path), "--threads", _threads(swarm_cfg)]

    names = ("flower", "fedavg", "server.log")
    return _run(swarm_cfg, bed, workdir, names, server, client, repeat, target)


def run_torchft(
    swarm_cfg: SwarmConfig, bed: Testbed, workdir: Path, python: Path, repeat: int, target: float | None
) -> WanRun:
    """torchft's DiLoCo on the testbed: the Lighthouse on the coordinator host, replica i on host i, H =
    train.local_steps inner steps per outer step (Nesterov SGD, lr 0.7, momentum 0.9). Raises BenchError."""
    from node.app.bench.torchft_env import lighthouse_command

    bind = f"{bed.addresses[coordinator_host(bed, swarm_cfg)]}:{COORDINATOR_PORT}"

    def replica(i: int, path: Path) -> list[str]:
        return [str(python), "-m", "node.app.bench.torchft_app", "replica", "--lighthouse", f"http://{bind}",
                "--config", str(path), "--replica-id", str(i), "--nodes", str(swarm_cfg.nodes),
                "--host", bed.addresses[i], "--threads", _threads(swarm_cfg)]  # fmt: skip

    names = ("torchft", "diloco", "lighthouse.log")
    lighthouse = lighthouse_command(python, bind, swarm_cfg.nodes)
    return _run(swarm_cfg, bed, workdir, names, lighthouse, replica, repeat, target)

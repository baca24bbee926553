"""`atoll swarm up`: N node daemons as separate processes on 127.0.0.1, a live table, and a
summary against a centralized baseline trained in the same run.

Each node is a real `atoll node start` process with its own identity, DHT daemon, gRPC server
and metrics endpoint; node 0 bootstraps the others. Nodes report progress as JSON lines on
stdout (`--json-events`), which is all this orchestrator reads.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.data import ChainDataset, ConcatDataset, IterableDataset, TensorDataset

from node.config import ConfigError, NodeConfig, SwarmConfig
from node.net.threads import usable_cores
from node.protocol.train import LocalTrainer
from p2pd.procs import kill_tree


@dataclass
class NodeRun:
    """One node process of the swarm: its index, the process, a queue of the JSON events it printed (each with `_t`,
    the time.monotonic() it was read), its ready, last and final events, every round event, log file, model name
    and when it was started (time.monotonic())."""

    index: int
    proc: subprocess.Popen
    events: queue.Queue = field(default_factory=queue.Queue)
    joinable: dict | None = None
    ready: dict | None = None
    last: dict | None = None
    final: dict | None = None
    log_path: Path | None = None
    model: str = ""
    started: float = field(default_factory=time.monotonic)
    rounds: list[dict] = field(default_factory=list)


Wrap = Callable[[int, list[str]], list[str]]  # (node index, argv) -> the argv that runs it where it belongs


def _reader(run: NodeRun) -> None:
    with run.proc.stdout:  # closed once the process closed its end
        _read_events(run)


def _read_events(run: NodeRun) -> None:
    for line in run.proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                event["_t"] = time.monotonic()
                run.events.put(event)


def spawn(command: list[str], index: int, log_path: Path, env: dict | None = None, model: str = "") -> NodeRun:
    """Start `command` in its own session (see kill_tree), stderr to `log_path`, with a thread queueing the JSON
    events it prints on stdout; returns its NodeRun."""
    with open(log_path, "wb") as log:  # the child keeps its own descriptor of the log
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(env or os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
    run = NodeRun(index, proc, log_path=log_path, model=model)
    threading.Thread(target=_reader, args=(run,), daemon=True).start()
    return run


def node_command(config_path: Path) -> list[str]:
    """The command line that starts one node daemon from `config_path`, printing JSON events on stdout."""
    return [sys.executable, "-m", "node.app.cli", "node", "start", "--config", str(config_path), "--json-events"]


def start_node(cfg: NodeConfig, workdir: Path, wrap: Wrap | None = None) -> NodeRun:
    """Write `cfg` to workdir/node<i>.yaml and start that node in its own session (stderr to node<i>.log), with a
    thread queueing its JSON events; returns its NodeRun. `wrap(i, argv)`: the command line that runs argv for node
    i (e.g. inside a network namespace of a testbed), None to run it as it is."""
    path = workdir / f"node{cfg.node_index}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    argv = node_command(path) if wrap is None else wrap(cfg.node_index, node_command(path))
    return spawn(argv, cfg.node_index, workdir / f"node{cfg.node_index}.log", model=model_name(cfg))


def node_configs(swarm_cfg: SwarmConfig, workdir: Path) -> list[NodeConfig]:
    """Every node's config: shared config, per-node overrides, its own key and checkpoints under `workdir`, and
    addresses on one host. A fixed port set for every node (net.grpc_port, metrics_port, a TCP port in
    net.dht_listen) is a base: node i gets base + i; one set in per_node is that node's own. net.host and
    net.advertise_host are kept when set (default: 127.0.0.1). Raises ConfigError, in one line, for what cannot apply
    to N nodes on one host: one identity file or one announced multiaddr for all of them, ports past 65535."""
    default = NodeConfig()
    shared = swarm_cfg.node
    if swarm_cfg.nodes > 1 and shared.net.identity_path != default.net.identity_path:
        raise ConfigError("swarm up gives each node its own key under --workdir: remove net.identity_path")
    if swarm_cfg.nodes > 1 and shared.net.announce_maddrs:
        raise ConfigError(
            "net.announce_maddrs names one node's address: set it per node (per_node: {i: {net.announce_maddrs: "
            "[...]}}) or remove it"
        )
    cfgs = []
    for i in range(swarm_cfg.nodes):
        c = swarm_cfg.config_for(i)
        own = _set_per_node(swarm_cfg.per_node.get(i, {}))
        offset = 0 if swarm_cfg.nodes == 1 else i
        if "net.identity_path" not in own:
            c.net.identity_path = workdir / f"node{i}" / "node.key"
        if c.checkpoint_dir == default.checkpoint_dir:
            c.checkpoint_dir = workdir / f"node{i}" / "checkpoints"
        elif "checkpoint_dir" not in own and swarm_cfg.nodes > 1:
            c.checkpoint_dir = c.checkpoint_dir / f"node{i}"
        if "net.grpc_port" not in own and c.net.grpc_port:
            c.net.grpc_port = _port(c.net.grpc_port + offset, "net.grpc_port")
        if "metrics_port" not in own and c.metrics_port:
            c.metrics_port = _port(c.metrics_port + offset, "metrics_port")
        if "net.dht_listen" not in own:
            c.net.dht_listen = [_shift_tcp(m, offset) for m in c.net.dht_listen]
        if c.threads is None:  # the host's cores, shared: N nodes must not each use all of them
            c.threads = max(1, usable_cores() // swarm_cfg.nodes)
        cfgs.append(c)
    return cfgs


def _set_per_node(overrides: dict) -> set[str]:
    """The dotted names a per_node entry sets (`{net.grpc_port: 1}` or `{net: {grpc_port: 1}}`)."""
    out = set()
    for k, v in overrides.items():
        if isinstance(v, dict):
            out |= {f"{k}.{sub}" for sub in _set_per_node(v)}
        out.add(k)
    return out


def _port(port: int, name: str) -> int:
    if port > 65535:
        raise ConfigError(f"{name}: node ports count up from the one set, and {port} is past 65535: set a lower one")
    return port


def _shift_tcp(maddr: str, offset: int) -> str:
    """`/ip4/H/tcp/P` with P + offset (P = 0, any free port, stays 0)."""
    parts = maddr.split("/")
    for k in range(len(parts) - 1):
        if parts[k] == "tcp" and parts[k + 1].isdigit() and int(parts[k + 1]):
            parts[k + 1] = str(_port(int(parts[k + 1]) + offset, "net.dht_listen"))
    return "/".join(parts)


def model_name(cfg: NodeConfig) -> str:
    """`family:width` of the node's model, e.g. `cnn:32`, or its task's reference without the
    folders, e.g. `mytask.py:task` or `text:kjv`: short enough for a table column."""
    if cfg.task is None:
        return f"{cfg.model.family}:{cfg.model.width}"
    where, _, attr = cfg.task.rpartition(":")
    if where.endswith(".py"):  # a file: its name without the folders
        return f"{Path(where).name}:{attr}"
    return f"{where.rsplit('.', 1)[-1]}:{attr}"  # a module: its last part


def centralized_baselines(swarm_cfg: SwarmConfig) -> dict[str, float]:
    """One centralized baseline per model the swarm runs (a mixed swarm has several)."""
    firsts = {}
    for i in range(swarm_cfg.nodes):
        c = swarm_cfg.config_for(i)
        firsts.setdefault(model_name(c), c)
    return {name: centralized_baseline(c) for name, c in firsts.items()}


def centralized_baseline(base: NodeConfig) -> float:
    """Same task, model, init, optimizer and schedule, trained on the union of every node's
    training data with the same number of steps as one node (rounds x local steps); returns the
    task's metric."""
    from node.protocol.worker import Worker

    worker = Worker(base.model_copy(update={"node_index": 0}))
    parts = [worker.task.train_data(i, base.node_count, base.data.seed) for i in range(base.node_count)]
    if all(isinstance(p, TensorDataset) for p in parts):  # stays indexed in place
        data = TensorDataset(*(torch.cat(ts) for ts in zip(*(p.tensors for p in parts))))
    elif any(isinstance(p, IterableDataset) for p in parts):
        data = ChainDataset(parts)
    else:
        data = ConcatDataset(parts)
    o, t = base.optim, base.train
    worker.data = data
    worker.trainer.close()
    worker.trainer = LocalTrainer(
        worker.model,
        worker.optimizer,
        data,
        worker.task.loss,
        o.batch_size,
        t.seed,
        o.sam_rho,
        t.loader_workers,
        worker.autocast,
    )
    for r in range(base.train.rounds):
        worker.train(r)
    return worker.evaluate()


def run_swarm(
    swarm_cfg: SwarmConfig,
    workdir: Path,
    on_update,
    stop: threading.Event | None = None,
    stop_grace: float = 60.0,
    wrap: Wrap | None = None,
) -> list[NodeRun]:
    """Start the swarm, feed events to on_update(runs), wait for every node to finish. `wrap`: see start_node.

    Once `stop` is set (Ctrl-C), every node gets SIGTERM (it finishes its step, checkpoints and
    leaves) and is waited for up to `stop_grace` seconds; the runs are returned as they got."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfgs = node_configs(swarm_cfg, workdir)
    stop = stop or threading.Event()
    runs: list[NodeRun] = []
    deadline = time.monotonic() + swarm_cfg.timeout
    try:
        runs.append(start_node(cfgs[0], workdir, wrap))
        _wait_ready(runs[0], deadline, stop, "joinable")  # its DHT is up: the others can join through it
        for c in cfgs[1:]:
            if stop.is_set():
                break
            c.net.initial_peers = runs[0].joinable["maddrs"]
            runs.append(start_node(c, workdir, wrap))
        for r in runs:
            _wait_ready(r, deadline, stop)
        on_update(runs)
        stopping = False
        while any(r.final is None for r in runs):
            if stop.is_set() and not stopping:
                stopping, deadline = True, time.monotonic() + stop_grace
                for r in runs:
                    if r.proc.poll() is None:
                        r.proc.send_signal(signal.SIGTERM)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "nodes did not stop in time"
                    if stopping
                    else f"swarm did not finish within {swarm_cfg.timeout:.0f} s"
                )
            for r in runs:
                _drain(r)
                if r.final is None and r.proc.poll() is not None:
                    _drain(r)
                    if r.final is None and not stopping:
                        raise RuntimeError(f"node {r.index} exited with code {r.proc.returncode}; see {r.log_path}")
            if stopping and all(r.proc.poll() is not None for r in runs):
                break
            on_update(runs)
            time.sleep(0.2)
        for r in runs:
            r.proc.wait(timeout=max(5.0, deadline - time.monotonic()))
            _drain(r)
        on_update(runs)
        return runs
    finally:
        for r in runs:
            kill_tree(r.proc.pid)


def _drain(run: NodeRun) -> None:
    while True:
        try:
            e = run.events.get_nowait()
        except queue.Empty:
            return
        kind = e.get("event")
        if kind == "joinable":
            run.joinable = e
        elif kind == "ready":
            run.ready = e
        elif kind == "round":
            run.last = e
            run.rounds.append(e)
        elif kind in ("done", "stopped"):
            run.final = e


def _wait_ready(run: NodeRun, deadline: float, stop: threading.Event, event: str = "ready") -> None:
    while getattr(run, event) is None:
        _drain(run)
        if getattr(run, event) is not None or stop.is_set():
            return
        if run.proc.poll() is not None:
            raise RuntimeError(
                f"node {run.index} exited with code {run.proc.returncode} before it was ready"
                f"{_last_error(run.log_path)}; see {run.log_path}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {run.index} was not ready in time; see {run.log_path}")
        time.sleep(0.1)


def _last_error(log_path: Path | None) -> str:
    """`: <the node's error line>` from its log, or "" if there is none."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    except (OSError, AttributeError):
        return ""
    return f": {lines[-1].removeprefix('error: ')}" if lines else ""


def check_workdir(workdir: Path) -> None:
    """A fresh place for the nodes' keys and checkpoints, or a clear refusal."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    if workdir.is_dir() and any(workdir.glob("node*")):
        raise ValueError(
            f"--workdir {workdir} already holds a swarm (its nodes would resume, not train): choose an empty directory"
        )


def round_timing(runs: list[NodeRun]) -> tuple[float | None, float | None]:
    """(median round in ms: over nodes, the median interval between a node's round events; the slowest node's
    seconds from its launch to its first round), None where there are too few round events."""
    per_node = []
    for r in runs:
        ts = [e["_t"] for e in r.rounds]
        if len(ts) > 1:
            per_node.append(statistics.median(b - a for a, b in zip(ts, ts[1:])))
    firsts = [r.rounds[0]["_t"] - r.started for r in runs if r.rounds]
    return (
        round(1000 * statistics.median(per_node), 1) if per_node else None,
        round(max(firsts), 2) if firsts and len(firsts) == len(runs) else None,
    )


def results(runs: list[NodeRun], baselines: dict[str, float], swarm_cfg: SwarmConfig, seconds: float) -> dict:
    """The run as JSON: per node its final event (None fields for a node stopped before it
    reported one), the baselines, the wall time and the config."""

    def node(r: NodeRun) -> dict:
        final, last = r.final or {}, r.last or {}
        return {
            "index": r.index,
            "peer_id": (r.ready or {}).get("peer_id"),
            "model": r.model,
            "metric": final.get("metric", last.get("metric", "accuracy")),
            "final_score": final.get("score", last.get("score")),
            "final_accuracy": final.get("accuracy", last.get("accuracy")),
            "rounds": final.get("round", last.get("round")),
            "state": final.get("event", "killed"),
            "sent_bytes": final.get("sent_bytes", last.get("sent_bytes")),
            "received_bytes": final.get("received_bytes", last.get("received_bytes")),
            "dataset_size": final.get("dataset_size"),
            "model_digest": final.get("model_digest"),
            "merged_with": final.get("merged_with"),
        }

    round_ms, first_round = round_timing(runs)
    return {
        "nodes": [node(r) for r in runs],
        "centralized_baseline": baselines,  # by model: the task's metric
        "wall_seconds": round(seconds, 2),
        "median_round_ms": round_ms,
        "first_round_seconds": first_round,  # the slowest node, from its launch
        "config": swarm_cfg.model_dump(mode="json"),
    }

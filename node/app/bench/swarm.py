"""`atoll bench swarm`: one task run by an atoll swarm and by what users would pick instead,
alternated in one invocation on the same machine.

- ``atoll``: `atoll swarm up` (real daemons: DHT, gRPC, checkpoints, metrics), as `make demo`.
- ``flower``: Flower FedAvg, one server and one client per node (node/app/bench/flower_app.py), in
  a virtual environment of its own that the benchmark creates on first use.

Both train the same workers (node/protocol/worker.py: model, init, partition, sampler, optimizer, step
size schedule) with the same intra-op threads per node. Each process is started in its own
session; its whole process tree (DHT child, p2pd, ...) is sampled every 0.2 s for memory (PSS:
pages shared with other processes split among them, so the sum over the host is the host's
memory) and CPU time. Per run: the median round (interval between a node's round events; every
system evaluates once per round), the time from the first launch until every node reports the
target accuracy, from a node's launch to its first round, bytes moved per node, CPU seconds per
node and the peak memory of a node's tree.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.app.bench import worst_curve
from node.app.swarm import NodeRun, _drain, round_timing, run_swarm, spawn
from node.config import SwarmConfig
from node.net.threads import usable_cores
from p2pd.procs import kill_tree

SYSTEMS = ("atoll", "flower")
FLOWER_VERSION = "1.42.0"
SAMPLE_SECONDS = 0.2
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A system could not be run (its environment, a process that failed); the message says which."""


@dataclass
class Run:
    """One system's run: the figures of the module docstring (None where not reached)."""

    system: str
    repeat: int
    round_ms: float | None = None
    to_target_s: float | None = None
    first_round_s: float | None = None
    wall_s: float = 0.0
    final_min_accuracy: float | None = None
    mb_per_node: float = 0.0
    cpu_s_per_node: float = 0.0
    peak_mb_per_node: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, min accuracy over nodes)


# -- measuring process trees -------------------------------------------------------------------
def session_usage(sid: int) -> tuple[float, float]:
    """(PSS in MB, CPU seconds) summed over the live processes of session `sid` (Linux /proc)."""
    pss_kb, ticks = 0, 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != sid:  # field 6 of stat: the session id
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
            with open(f"/proc/{name}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss_kb += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):  # a process that left while we read it
            continue
    return pss_kb / 1024, ticks / _TICKS


class Usage:
    """Peak memory and last CPU time of each session, sampled by `sample()`."""

    def __init__(self):
        """No session sampled yet: the first `sample()` measures at once."""
        self.peak_mb: dict[int, float] = {}
        self.cpu_s: dict[int, float] = {}
        self._next = 0.0

    def sample(self, sids: list[int]) -> None:
        """Sample `sids` at most every SAMPLE_SECONDS."""
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + SAMPLE_SECONDS
        for sid in sids:
            mb, cpu = session_usage(sid)
            if mb:
                self.peak_mb[sid] = max(self.peak_mb.get(sid, 0.0), mb)
                self.cpu_s[sid] = max(self.cpu_s.get(sid, 0.0), cpu)


# -- summarising -----------------------------------------------------------------------------
def summarize(
    system: str, repeat: int, nodes: list[NodeRun], t0: float, t_end: float, usage: Usage, extra: list[int], target
) -> Run:
    """Figures of one run from the nodes' round events (`_t`: when read) and the sampled usage;
    `extra`: sessions that serve the nodes (Flower's server), counted in CPU and memory per node."""
    run = Run(system, repeat, wall_s=round(t_end - t0, 2))
    run.round_ms, run.first_round_s = round_timing(nodes)
    # every node's latest accuracy, over time
    events = [(e["_t"] - t0, n.index, e["accuracy"]) for n in nodes for e in n.rounds if e.get("accuracy") is not None]
    run.curve, run.to_target_s = worst_curve(events, len(nodes), False, target)
    finals = [(n.final or n.last or {}).get("accuracy") for n in nodes]
    if all(a is not None for a in finals):
        run.final_min_accuracy = min(finals)
    moved = [(n.final or n.last or {}) for n in nodes]
    run.mb_per_node = round(
        sum(e.get("sent_bytes", 0) + e.get("received_bytes", 0) for e in moved) / len(nodes) / 1e6, 2
    )
    sids = [n.proc.pid for n in nodes] + extra
    run.cpu_s_per_node = round(sum(usage.cpu_s.get(s, 0.0) for s in sids) / len(nodes), 2)
    server_share = sum(usage.peak_mb.get(s, 0.0) for s in extra) / len(nodes)
    run.peak_mb_per_node = round(max(usage.peak_mb.get(n.proc.pid, 0.0) for n in nodes) + server_share, 1)
    return run


# -- the systems -----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the Flower server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_atoll(swarm_cfg: SwarmConfig, workdir: Path, repeat: int, target: float) -> Run:
    """The swarm as `atoll swarm up` starts it."""
    usage, t0 = Usage(), time.monotonic()
    runs = run_swarm(swarm_cfg, workdir, lambda runs: usage.sample([r.proc.pid for r in runs]))
    return summarize("atoll", repeat, runs, t0, time.monotonic(), usage, [], target)


def flower_python(venv: Path, progress=print) -> Path:
    """The Python of the Flower environment at `venv`, created on first use with flwr FLOWER_VERSION and what
    atoll's Worker needs (node/app/bench/venvs.py). Raises BenchError when it cannot be created."""
    from node.app.bench.venvs import baseline_python, requirements

    return baseline_python(venv, "flower", requirements(f"flwr=={FLOWER_VERSION}"), progress)


def run_flower(swarm_cfg: SwarmConfig, workdir: Path, repeat: int, target: float, python: Path) -> Run:
    """Flower FedAvg: a server and one client per node, each process in its own session."""
    from node.protocol.data.datasets import digits_file

    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    threads = max(1, usable_cores() // swarm_cfg.nodes)
    rounds = swarm_cfg.node.train.rounds
    usage, t0, procs = Usage(), time.monotonic(), []
    app = [str(python), "-m", "node.app.bench.flower_app"]
    try:
        server = spawn(
            app + ["server", "--address", address, "--nodes", str(swarm_cfg.nodes), "--rounds", str(rounds)],
            -1,
            workdir / "server.log",
            env,
        )
        procs.append(server)
        clients = []
        for i in range(swarm_cfg.nodes):
            c = swarm_cfg.config_for(i)
            if c.data.dataset == "digits" and c.data.path is None:
                c.data.path = digits_file()  # the Flower environment has no scikit-learn
            path = workdir / f"node{i}.json"
            path.write_text(json.dumps(c.model_dump(mode="json")))
            cmd = app + ["client", "--address", address, "--config", str(path), "--threads", str(threads)]
            clients.append(spawn(cmd, i, workdir / f"node{i}.log", env))
        procs += clients
        deadline = time.monotonic() + swarm_cfg.timeout
        while any(p.proc.poll() is None for p in procs):
            failed = next((p for p in procs if p.proc.poll() not in (None, 0)), None)
            if failed is not None:  # the others would wait for it until the timeout
                raise BenchError(f"a Flower process exited with code {failed.proc.returncode}; see {failed.log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"Flower did not finish within {swarm_cfg.timeout:.0f} s; see {workdir}")
            usage.sample([p.proc.pid for p in procs])
            time.sleep(0.05)
        t_end = time.monotonic()
        for p in procs:
            _drain(p)
            if p.proc.returncode != 0:
                raise BenchError(f"a Flower process exited with code {p.proc.returncode}; see {p.log_path}")
        return summarize("flower", repeat, clients, t0, t_end, usage, [server.proc.pid], target)
    finally:
        for p in procs:
            kill_tree(p.proc.pid)


def run(
    swarm_cfg: SwarmConfig,
    repeats: int,
    target: float,
    systems=SYSTEMS,
    flower_venv: Path | None = None,
    progress=print,
) -> list[Run]:
    """`repeats` rounds of every system in turn (atoll, flower, atoll, flower, ...). Raises
    BenchError for a task whose metric is not accuracy (the target is an accuracy)."""
    if swarm_cfg.node.task is not None:
        raise BenchError("bench swarm compares accuracy on the built-in image tasks: remove task from the config")
    python = None
    if "flower" in systems:
        python = flower_python(flower_venv or Path.home() / ".cache" / "atoll" / "flower-venv", progress)
    runs = []
    with tempfile.TemporaryDirectory(prefix="atoll-bench-swarm-") as tmp:
        for k in range(repeats):
            for system in systems:
                workdir = Path(tmp) / f"{system}{k}"
                if system == "atoll":
                    r = run_atoll(swarm_cfg, workdir, k, target)
                else:
                    r = run_flower(swarm_cfg, workdir, k, target, python)
                progress(
                    f"  {system:<7} repeat {k + 1}/{repeats}: round {r.round_ms} ms, to target {r.to_target_s} s, "
                    f"first round {r.first_round_s} s, wall {r.wall_s} s, peak {r.peak_mb_per_node:.0f} MB"
                )
                runs.append(r)
    return runs


# -- reporting -------------------------------------------------------------------------------
COLUMNS = (
    ("round_ms", "median round (ms)"),
    ("to_target_s", "to target on every node (s)"),
    ("first_round_s", "launch to first round, slowest node (s)"),
    ("wall_s", "wall (s)"),
    ("final_min_accuracy", "final accuracy, worst node"),
    ("mb_per_node", "MB moved per node"),
    ("cpu_s_per_node", "CPU s per node"),
    ("peak_mb_per_node", "peak memory per node (MB, PSS)"),
)


def medians(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    """system -> column -> median over repeats (None when any repeat did not reach it)."""
    out = {}
    for system in dict.fromkeys(r.system for r in runs):
        mine = [r for r in runs if r.system == system]
        out[system] = {}
        for key, _ in COLUMNS:
            values = [getattr(r, key) for r in mine]
            out[system][key] = None if any(v is None for v in values) else round(statistics.median(values), 3)
    return out


def table(runs: list[Run], target: float) -> str:
    """A markdown table: median over repeats per system, and its ratio to atoll's."""
    med = medians(runs)
    systems = list(med)
    head = "| | " + " | ".join(systems) + " | " + " | ".join(f"{s} / atoll" for s in systems if s != "atoll") + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(systems) - 1)]
    for key, label in COLUMNS:
        label = label.replace("target", f"{target:.0%}")
        cells = ["—" if med[s][key] is None else f"{med[s][key]:g}" for s in systems]
        ratios = []
        for s in systems:
            if s == "atoll":
                continue
            a, b = med["atoll"].get(key), med[s][key]
            ratios.append("—" if not a or b is None else f"{b / a:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def write_outputs(runs: list[Run], out: Path, meta: dict, target: float) -> list[Path]:
    """results.json, table.md and swarm.png (worst node's accuracy against time, every run)."""
    from node.app.bench import write_results
    from node.app.plotting import pyplot

    written = write_results(
        out, {"meta": meta, "medians": medians(runs), "runs": [asdict(r) for r in runs]}, table(runs, target)
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r.system for r in runs))}
    for r in runs:
        if r.curve:
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, color=colours[r.system], alpha=0.8, label=r.system if r.repeat == 0 else None)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the first process started")
    ax.set_ylabel("accuracy of the worst node")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("Same task, same machine: every repeat")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "swarm.png", dpi=120)
    plt.close(fig)
    return [*written, out / "swarm.png"]

"""Stopping a real atoll process the ways operators do: Ctrl-C (SIGINT to the terminal's
process group), `kill -TERM -- -PGID`, SIGTERM to the main process alone (timeout, a plain
kill), and SIGKILL. Each must leave no process of its tree behind (the node, hivemind's DHT
child, p2pd) within 10 s, and a graceful stop must write its checkpoint.

Before the fix, SIGINT to the group hung forever: p2pd died of the signal, the forked DHT child
ignored hivemind's SIGTERM because it had inherited the node's handler, and the main process
waited for it at exit; after SIGKILL the DHT child and p2pd lived on as orphans."""

import json
import os
import signal
import sys
import time

import psutil
import pytest
import yaml
from helpers import NodeProcess

pytestmark = pytest.mark.integration
GONE_WITHIN = 10.0


def _tree(pid: int) -> list[psutil.Process]:
    """The process and every descendant, plus anything else in its session (a DHT child that
    moved to a process group of its own stays in the session)."""
    procs = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        procs[p.pid] = p
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                procs[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(procs.values())


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid}:{p.name()}")
        except psutil.NoSuchProcess:
            continue
    return left


def _signal(node: NodeProcess, how: str) -> float:
    t = time.time()
    {
        "int-group": lambda: os.killpg(node.pid, signal.SIGINT),
        "term-group": lambda: os.killpg(node.pid, signal.SIGTERM),
        "term-main": lambda: os.kill(node.pid, signal.SIGTERM),
        "kill-main": lambda: os.kill(node.pid, signal.SIGKILL),
    }[how]()
    return t


def _stop_and_watch(node: NodeProcess, how: str) -> float:
    """Send the signal; assert the whole tree is gone within GONE_WITHIN; return the send time."""
    tree = _tree(node.pid)
    names = " ".join(p.name() for p in tree)
    assert "p2pd" in names and len(tree) >= 3, f"expected node, DHT child and p2pd, got {names}"
    sent = _signal(node, how)
    deadline = time.monotonic() + GONE_WITHIN
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(tree)
    node.proc.wait(5) if not left else None
    assert not left, f"{how}: still running {GONE_WITHIN:.0f} s after the signal: {left}"
    return sent


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.app.cli", *args]


def _write(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_nodes_stop_whole_and_checkpoint_however_they_are_signalled(tmp_path):
    """Four nodes at once (each in its own session, as from its own terminal), each stopped
    one way: Ctrl-C to its group, SIGTERM to its group, SIGTERM to its main process, SIGKILL."""
    ways = ["int-group", "term-group", "term-main", "kill-main"]
    nodes = {}
    try:
        for how in ways:
            cfg = _write(
                tmp_path / f"{how}.yaml",
                {
                    "checkpoint_dir": str(tmp_path / how / "ck"),
                    "metrics_port": None,
                    "train": {"rounds": 100_000, "local_steps": 5},
                    "net": {"swarm": f"stop-{how}", "identity_path": str(tmp_path / f"{how}.key"), "record_ttl": 4},
                },
            )
            nodes[how] = NodeProcess(
                "--config",
                str(cfg),
                command=_cli("node", "start", "--json-events"),
                stderr_path=tmp_path / f"{how}.log",
            )
        for node in nodes.values():
            node.ready(120)
            node.wait_event("round", 60, lambda e: e["round"] >= 2)
        for how, node in nodes.items():
            log = tmp_path / f"{how}.log"
            sent = _stop_and_watch(node, how)
            state = json.loads((tmp_path / how / "ck" / "state.json").read_text())
            if how == "kill-main":
                assert node.proc.returncode == -signal.SIGKILL
                continue
            assert node.proc.returncode == 0, (how, log.read_text()[-2000:])
            stopped = node.wait_event("stopped", 5)
            assert state["time"] >= sent - 0.5, f"{how}: no checkpoint written at the stop"
            assert state["round"] == stopped["round"]
            assert "Traceback" not in log.read_text()
    finally:
        for node in nodes.values():
            node.stop()


def _role_config(tmp_path, role: str, **experts) -> str:
    return str(
        _write(
            tmp_path / f"{role}.yaml",
            {
                "role": role,
                "checkpoint_dir": str(tmp_path / "ck"),
                "metrics_port": None,
                "experts": {"clusters": 2, "cluster": 0, "width": 32, "sample_steps": 5, **experts},
                "net": {"swarm": "stop", "identity_path": str(tmp_path / f"{role}.key"), "record_ttl": 4},
            },
        )
    )


def test_an_expert_stopped_by_ctrl_c_while_training_checkpoints_and_leaves_nothing(tmp_path):
    cfg = _role_config(tmp_path, "expert", steps=1_000_000, checkpoint_every=20)
    node = NodeProcess(
        "--config",
        cfg,
        command=_cli("expert", "train", "--cluster", "0", "--serve", "--json-events"),
        stderr_path=tmp_path / "e.log",
    )
    try:
        node.wait_event("expert", 90)  # joined the swarm (DHT up), now training
        time.sleep(1.0)
        sent = _stop_and_watch(node, "int-group")
        assert node.proc.returncode == 0, (tmp_path / "e.log").read_text()[-2000:]
        stopped = node.wait_event("stopped", 5)
        state = json.loads((tmp_path / "ck" / "expert-0" / "state.json").read_text())
        assert state["step"] == stopped["step"] > 0
        assert (tmp_path / "ck" / "expert-0" / "state.json").stat().st_mtime >= sent - 0.5
    finally:
        node.stop()


def test_a_serving_router_stopped_by_ctrl_c_leaves_nothing(tmp_path):
    cfg = _role_config(tmp_path, "router", router_steps=30, checkpoint_every=10)
    node = NodeProcess(
        "--config", cfg, command=_cli("router", "serve", "--json-events"), stderr_path=tmp_path / "r.log"
    )
    try:
        node.ready(120)
        _stop_and_watch(node, "int-group")
        assert node.proc.returncode == 0, (tmp_path / "r.log").read_text()[-2000:]
        node.wait_event("stopped", 5)
        assert json.loads((tmp_path / "ck" / "router" / "state.json").read_text())["step"] == 30
    finally:
        node.stop()

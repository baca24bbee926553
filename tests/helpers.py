"""Starting and stopping real node processes for integration tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def kill_tree(pid: int, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
    """Signal a process and every descendant (DHT child, p2pd grandchild) by pid, then reap."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:  # SIGTERM ignored: force
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class NodeProcess:
    """tests/peer_node.py in its own process; its stdout JSON lines are collected as events."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "peer_node.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.pid = self.proc.pid
        self.events: queue.Queue = queue.Queue()
        self.info: dict | None = None
        self.last_peers: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def wait_event(self, kind: str, timeout: float, predicate=lambda e: True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node {self.pid} exited with {self.proc.returncode}")
                continue
            if e.get("event") == "peers":
                self.last_peers = e["peers"]
            if e.get("event") == kind and predicate(e):
                return e
        raise TimeoutError(f"node {self.pid}: no {kind!r} event within {timeout} s")

    def ready(self, timeout: float = 60.0) -> dict:
        self.info = self.wait_event("ready", timeout)
        return self.info

    def stop(self, timeout: float = 20.0) -> int | None:
        """Clean leave (SIGTERM); anything left is killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(self.pid)
        return self.proc.returncode

    def kill(self) -> None:
        """Crash: SIGKILL the node and its DHT/p2pd descendants at once."""
        kill_tree(self.pid, signal.SIGKILL)
        self.proc.wait(10)

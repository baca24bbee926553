"""Starting hivemind's background processes with a bounded wait, and stopping a process
together with everything it started (DHT processes, p2pd daemons)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
from typing import Callable, TypeVar

import psutil

log = logging.getLogger(__name__)

P = TypeVar("P")


def start_hivemind_process(make: Callable[[], P], *, ready_timeout: float = 60.0, attempts: int = 2) -> P:
    """Start a hivemind background process (a DHT or an averager, created with start=False by
    `make`) and wait, bounded, until it serves.

    hivemind forks these processes and then waits for them with no bound. A fork taken while
    another thread of the parent holds a lock (gRPC's, torch's, logging's) can leave the
    child stuck forever before it reports ready; CI once hung 300 s on exactly that. So the
    wait is bounded, a stuck child is killed with what it started, and the start is tried
    again. A start that fails with an error (an unreachable initial peer, say) is not retried.
    Raises TimeoutError when no attempt became ready.
    """
    for attempt in range(1, attempts + 1):
        proc = make()
        proc.run_in_background(await_ready=False)  # as hivemind's start=True does, minus the unbounded wait
        try:
            proc.wait_until_ready(ready_timeout)
            return proc
        except concurrent.futures.TimeoutError:
            log.warning("%s process %s not ready after %.0f s (attempt %d of %d); killing it",
                        type(proc).__name__, proc.pid, ready_timeout, attempt, attempts)
            kill_tree(proc.pid, timeout=5)
        except BaseException:
            kill_tree(proc.pid, timeout=5)
            raise
    raise TimeoutError(f"the {type(proc).__name__} process did not become ready within {ready_timeout:.0f} s, "
                       f"{attempts} times")


def kill_tree(pid: int, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a process, all its descendants and every member of its process group, then reap.

    The group matters: a node that died has left its DHT process and p2pd orphaned (they are
    no longer its children) but still in its process group, since nodes start in their own
    session (see start_node)."""
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getpgid(p.pid) == pid:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for p in procs.values():
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)

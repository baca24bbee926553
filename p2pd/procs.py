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

    hivemind forks these processes and then waits for them with no bound. The child reports
    "ready" through MPFuture, which writes under a lock shared by every process forked from
    this one; a hivemind child killed while holding it (hivemind's own shutdown terminates
    children that are slow to leave) leaves it held forever, and then every later child hangs
    before it reports ready. CI hung 300 s on exactly that. So the lock is checked first and
    hivemind's process-wide future backend reset if it is orphaned, the wait is bounded, a
    stuck child is killed with what it started, and the start is tried again. A start that
    fails with an error (an unreachable initial peer, say) is not retried.
    Raises TimeoutError when no attempt became ready.
    """
    for attempt in range(1, attempts + 1):
        repair_orphaned_future_locks()
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


def repair_orphaned_future_locks(wait: float = 2.0) -> bool:
    """Reset hivemind's MPFuture backend if one of its cross-process locks is held by nobody
    alive; True if it was. A holder only writes one message to a pipe under it, so a lock
    still held after `wait` seconds belongs to a dead process. The reset gives processes
    forked from now on fresh locks; futures in flight are lost, so call it only at start-up."""
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    for lock in (MPFuture._update_lock, SharedBytes._lock):
        if not lock.acquire(timeout=wait):
            log.warning("a hivemind process died holding a shared lock; resetting hivemind's future backend")
            MPFuture.reset_backend()
            return True
        lock.release()
    return False


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

"""hivemind's background processes (the DHT with its p2pd, the averager): started with a
bounded wait, bound to the process that started them, and stopped with everything they started.

hivemind forks these processes from the node. A plain fork leaves the child in the node's
process group with the node's Python signal handlers, which caused two faults in the field:
Ctrl-C (SIGINT to the terminal's foreground group) killed p2pd under the DHT before the node
could leave, and the child, running the node's "stop requested" handler, ignored the SIGTERM
that hivemind's shutdown sends, so the node waited for it forever at exit; after a SIGKILL of
the node, the child and p2pd lived on as orphans. So every child started here (see
`bind_to_parent`) leads a process group of its own (signals meant for the node reach the node
only; the node stops its children in order), ignores SIGINT, ends its whole group (itself and
p2pd) on SIGTERM, and ends it as well when a watchdog thread sees the node gone.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

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
        bind_to_parent(proc)
        proc.run_in_background(await_ready=False)  # as hivemind's start=True does, minus the unbounded wait
        try:
            proc.wait_until_ready(ready_timeout)
            return proc
        except concurrent.futures.TimeoutError:
            log.warning(
                "%s process %s not ready after %.0f s (attempt %d of %d); killing it",
                type(proc).__name__,
                proc.pid,
                ready_timeout,
                attempt,
                attempts,
            )
            kill_tree(proc.pid, timeout=5)
        except BaseException:
            kill_tree(proc.pid, timeout=5)
            raise
    raise TimeoutError(
        f"the {type(proc).__name__} process did not become ready within {ready_timeout:.0f} s, {attempts} times"
    )


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


def bind_to_parent(proc: Any) -> None:
    """Make the child that `proc.start()` forks (a multiprocessing.Process such as hivemind's
    DHT or DecentralizedAverager) run `_bound_child` before its own `run`; see the module
    docstring for why. Objects without `run` are left alone."""
    run = getattr(proc, "run", None)
    if run is None:
        return
    parent = os.getpid()

    def run_bound() -> None:
        _bound_child(parent)
        run()

    proc.run = run_bound


def _bound_child(parent: int, poll: float = 0.5) -> None:
    """Runs first in a forked child: own process group, SIGINT ignored, SIGTERM ends the group,
    and a watchdog ends the group once `parent` is gone (the child is then re-parented)."""
    try:
        os.setpgid(0, 0)
    except OSError as e:  # still bound by the watchdog; only Ctrl-C isolation is lost
        log.debug("setpgid in child failed: %s", e)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_own_group)

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.killpg(os.getpgrp(), signal.SIGTERM)  # handled by _end_own_group in the main thread
        time.sleep(5.0)  # a main thread stuck in C code never runs that handler
        os._exit(1)

    threading.Thread(target=watchdog, name="atoll-parent-watchdog", daemon=True).start()


def _end_own_group(*_: Any) -> None:
    """SIGTERM handler of a bound child: SIGTERM to its own process group (p2pd, which then
    removes its socket files, and this process, which now dies of it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_hivemind_process(proc: Any, timeout: float = 5.0) -> None:
    """hivemind's own shutdown (a graceful leave) of `proc`, then whatever is left of the
    child's process group (p2pd, or a child that did not leave in time) is stopped."""
    pid = proc.pid
    try:
        proc.shutdown()
    except Exception as e:  # a child that already died leaves hivemind's pipes broken
        log.debug("hivemind shutdown of %s failed: %s", pid, e)
    if pid is not None:
        kill_tree(pid, timeout=timeout)

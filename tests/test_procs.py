"""Bounded start of hivemind's background processes: a stuck child is killed and retried."""

import concurrent.futures
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from hivemind.utils.mpfuture import MPFuture

from p2pd.dht import start_dht
from p2pd.procs import repair_orphaned_future_locks, start_hivemind_process


class FakeProcess:
    """Stands in for hivemind.DHT / DecentralizedAverager: a real child process that either
    reports ready, never does (as a child stuck after fork), or fails."""

    started: list["FakeProcess"] = []

    def __init__(self, outcome: str):
        self.outcome = outcome
        self.proc: subprocess.Popen | None = None

    def run_in_background(self, await_ready: bool = True) -> None:
        assert await_ready is False
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        FakeProcess.started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until_ready(self, timeout: float) -> None:
        if self.outcome == "stuck":
            raise concurrent.futures.TimeoutError()
        if self.outcome == "error":
            raise RuntimeError("failed to connect to bootstrap peers")


@pytest.fixture(autouse=True)
def _reap():
    FakeProcess.started.clear()
    yield
    for f in FakeProcess.started:
        f.proc.kill()
        f.proc.wait(10)


def _gone(f: FakeProcess) -> bool:
    return f.proc.poll() is not None or not psutil.pid_exists(f.pid)


def test_a_stuck_child_is_killed_and_the_start_retried():
    outcomes = iter(["stuck", "ready"])
    got = start_hivemind_process(lambda: FakeProcess(next(outcomes)), ready_timeout=0.1)
    first, second = FakeProcess.started
    assert got is second
    assert _gone(first) and not _gone(second)


def test_every_attempt_stuck_raises_a_timeout_and_leaves_nothing_running():
    with pytest.raises(TimeoutError, match="did not become ready"):
        start_hivemind_process(lambda: FakeProcess("stuck"), ready_timeout=0.1, attempts=3)
    assert len(FakeProcess.started) == 3
    assert all(_gone(f) for f in FakeProcess.started)


def test_an_error_is_raised_at_once_not_retried():
    with pytest.raises(RuntimeError, match="bootstrap"):
        start_hivemind_process(lambda: FakeProcess("error"), ready_timeout=0.1)
    assert len(FakeProcess.started) == 1 and _gone(FakeProcess.started[0])


def test_an_orphaned_hivemind_lock_is_repaired_before_a_start():
    """A forked process dies holding hivemind's MPFuture lock: a later DHT would never report
    ready. The start repairs the lock and the real DHT starts."""

    def hold():
        MPFuture._update_lock.acquire()
        time.sleep(60)

    holder = mp.get_context("fork").Process(target=hold)
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while MPFuture._update_lock.acquire(timeout=0.05):  # until the child holds it
            MPFuture._update_lock.release()
            assert time.monotonic() < deadline, "the child never took the lock"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    assert not MPFuture._update_lock.acquire(timeout=0.5)  # orphaned: held by a dead process
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], ready_timeout=30)
    try:
        assert dht.get_visible_maddrs()
    finally:
        dht.shutdown()
        dht.join(10)
    assert not repair_orphaned_future_locks()  # healthy locks are left alone

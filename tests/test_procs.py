"""Bounded start of hivemind's background processes: a stuck child is killed and retried."""

import concurrent.futures
import subprocess
import sys

import psutil
import pytest

from p2pd.procs import start_hivemind_process


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

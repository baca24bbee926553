import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# The suite runs several torch processes at once on 2 cores: one intra-op thread each (nodes
# honour OMP_NUM_THREADS; this process and every node it starts inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def keydir(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    return d


# torch's shared-memory helper is started by torch itself, idles, and exits with this process
_OURS_TO_KEEP = {"torch_shm_manager"}


def _descendants():
    try:
        procs = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in procs if _safe(p.name) not in _OURS_TO_KEEP]


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    """Fail the session if a test left a process (a node, a DHT, a p2pd) running; kill it."""
    yield
    leaked = [p for p in _descendants() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [f"{p.pid}:{' '.join(_safe(p.cmdline) or [])[:120]}" for p in leaked]
    from p2pd.procs import kill_tree

    for p in leaked:
        kill_tree(p.pid, signal.SIGKILL)
    assert not leaked, f"tests leaked processes: {names}"


def _safe(fn):
    try:
        return fn()
    except psutil.Error:
        return None


def pytest_terminal_summary(terminalreporter):
    """One line: how many tests skipped for a missing Debian package, and which packages."""
    from sysdeps import REASON

    reasons = [str(r.longrepr[2]) for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple)]
    reasons = [r.split(REASON + ": ", 1)[1] for r in reasons if REASON + ": " in r]
    if not reasons:
        return
    counts: dict[str, int] = {}
    for reason in reasons:
        for pkg in reason.split(" (")[0].split():
            counts[pkg] = counts.get(pkg, 0) + 1
    listed = ", ".join(f"{p} ({c})" for p, c in sorted(counts.items()))
    terminalreporter.write_line(
        f"{len(reasons)} tests skipped for missing system packages: {listed}; "
        f"install them: sudo apt-get install {' '.join(sorted(counts))}"
    )

"""Named network namespaces and the processes started in them, removed whole at the end.

`Namespaces` creates namespaces under one prefix (the creating process's pid is in it, so parallel runs never
collide and a leftover of a dead run is recognised), starts commands inside them in their own sessions, and on
`close` stops every process in them (SIGTERM, then SIGKILL, then whatever left its process group) and deletes them.
Everything goes through `ip -n` / `ip netns exec`: the machine's own network namespace is never changed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

STOP_WAIT_S = 10.0


def ip(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """`ip ARGS`, output captured as text (never raises for a non-zero status)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)


def must(cmd: Sequence[str], timeout: float = 10) -> None:
    """Run `cmd`; raises RuntimeError with its status and stderr when it fails."""
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")


def netns_list() -> list[str]:
    """The names of the machine's named network namespaces (`ip netns list`)."""
    r = ip("netns", "list")
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """The processes running in namespace `name` (`ip netns pids`); empty when it is gone."""
    r = ip("netns", "pids", name)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


def unavailable(*programs: str, probe: Sequence[str] = (), needs: str = "") -> str | None:
    """Why network namespaces (and `programs`, e.g. "tc") cannot be used here, or None when they can. Tries the real
    thing once (`ip netns add`, then `probe` run inside it when given, which must succeed; `needs` says what it
    checks): root alone is not enough, containers often forbid it."""
    absent = [p for p in ("ip", *programs) if shutil.which(p) is None]
    if absent:
        return f"{', '.join(absent)} not installed (Debian: iproute2)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    name = f"atprobe{os.getpid()}"
    try:
        r = ip("netns", "add", name)
        if r.returncode != 0:
            return f"`ip netns add` fails here: {r.stderr.strip()}"
        if probe:
            r = ip("netns", "exec", name, *probe)
            if r.returncode != 0:
                return f"{needs or ' '.join(probe)} fails in a namespace: {r.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot build a network namespace: {e}"
    finally:
        ip("netns", "del", name)
    return None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Namespaces:
    """Namespaces named `<prefix>-<host>` and the processes started in them (see the module docstring)."""

    def __init__(self, prefix: str):
        """`prefix`: the start of every namespace's name (letters and digits; include the pid)."""
        self.prefix = prefix
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._closed = False

    def ns(self, host: str) -> str:
        """The namespace name of `host`."""
        return f"{self.prefix}-{host}"

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start `argv` inside `host`'s namespace, in its own session; stopped at `close`. Raises RuntimeError once
        closed."""
        if self._closed:
            raise RuntimeError("the namespaces are closed")
        proc = subprocess.Popen(self.exec_argv(host, argv), start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> None:
        """Stop `proc` (started elsewhere with `exec_argv`) at `close` as well."""
        self._procs.append(proc)

    def run(self, host: str, argv: Sequence[str], timeout: float = 10, **run_kwargs) -> subprocess.CompletedProcess:
        """Run a short command inside `host`'s namespace; output captured as text unless told otherwise."""
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        return subprocess.run(self.exec_argv(host, argv), timeout=timeout, **run_kwargs)

    def inside(self, host: str, *argv: str) -> None:
        """Run `argv` inside `host`'s namespace; raises RuntimeError when it fails."""
        must(self.exec_argv(host, argv))

    def add(self, host: str) -> None:
        """Create `host`'s namespace with its loopback up (a leftover of a dead run with our pid is replaced)."""
        name = self.ns(host)
        if name in netns_list():
            ip("netns", "del", name)
        must(["ip", "netns", "add", name])
        self._created.append(name)
        self.inside(host, "ip", "link", "set", "lo", "up")

    def _stop_started(self) -> None:
        """SIGTERM each started process group, wait up to STOP_WAIT_S in all, then SIGKILL what is left."""
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)

    def _kill_rest(self) -> None:
        """SIGKILL whatever still runs in our namespaces (children that left our process groups)."""
        for _ in range(50):
            pids = [pid for name in self._created for pid in netns_pids(name)]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        """Stop every process in the namespaces and delete them; safe to call again."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_started()
            self._kill_rest()
            for p in self._procs:  # reap them (killed above); never block for long
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for name in reversed(self._created):  # deleting a namespace removes its veths with it
                ip("netns", "del", name)
            self._created.clear()

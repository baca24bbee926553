"""A real NAT on one Linux machine, built from network namespaces, for tests of nodes behind NAT.

Loopback tests cannot show NAT trouble: every node can dial every other. Here a router namespace
joins a public LAN (a bridge with hosts ``pub1`` and ``pub2``) and a private LAN (host ``priv``)
and masquerades the private one, with no port forwarding. So ``priv`` can dial the public hosts
and is seen as the router's public address, while the public hosts cannot dial ``priv`` at all:
the situation of a home computer behind a router.

Building it needs root, ``ip`` (iproute2) and ``iptables``; ``unavailable()`` says why not when
it cannot be built here, and tests skip with that reason. All links are created with
``ip -n``/``ip netns exec``, so nothing changes in the machine's own network namespace. Both
LANs take addresses from 198.18.0.0/15, the range reserved for benchmarking networks (RFC 2544),
which no real network routes: the "private" side stands in for a home LAN without using one of
its ranges.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sysdeps import missing

ROUTER = "router"
_STOP_WAIT_S = 10.0
_open_prefixes: set[str] = set()


def _ip(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)


def _must(cmd: list[str], timeout: float = 10) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")


@functools.cache
def unavailable() -> str | None:
    """Why namespaces with a NAT router cannot be built on this machine, or None when they can.

    Tries the real thing once (a namespace with a MASQUERADE rule), since root alone is not
    enough: containers often forbid ``ip netns add`` or lack the kernel's nat table.
    """
    reason = missing("iproute2", "iptables")
    if reason:
        return reason
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"atprobe{os.getpid()}"
    try:
        r = _ip("netns", "add", probe)
        if r.returncode != 0:
            return f"`ip netns add` fails here: {r.stderr.strip()}"
        rule = ["-t", "nat", "-A", "POSTROUTING", "-s", "198.19.0.0/24", "-o", "lo", "-j", "MASQUERADE"]
        r = _ip("netns", "exec", probe, "iptables", *rule)
        if r.returncode != 0:
            return f"iptables' nat table fails in a namespace: {r.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot build a network namespace: {e}"
    finally:
        _ip("netns", "del", probe)
    return None


class Topology:
    """The namespaces of one ``nat_topology``, and the processes started in them.

    ``hosts`` maps ``pub1``, ``pub2`` and ``priv`` to their addresses; ``router_public_ip`` is
    the address under which the public hosts see ``priv``.
    """

    def __init__(self, prefix: str, public: ipaddress.IPv4Network, private: ipaddress.IPv4Network):
        self.prefix = prefix
        self.public = public
        self.private = private
        self.router_public_ip = str(public[1])
        self.router_private_ip = str(private[1])
        self.hosts = {"pub1": str(public[11]), "pub2": str(public[12]), "priv": str(private[2])}
        self._names = {h: f"{prefix}-{h}" for h in (ROUTER, *self.hosts)}
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._closed = False

    def ns(self, name: str) -> str:
        """The namespace name of host ``name`` (``pub1``, ``pub2``, ``priv`` or ``router``)."""
        return self._names[name]

    def _exec(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace, in its own session; stopped when the topology closes."""
        if self._closed:
            raise RuntimeError("the topology is closed")
        proc = subprocess.Popen(self._exec(host, argv), start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 10, **run_kwargs) -> subprocess.CompletedProcess:
        """Run a short command inside ``host``'s namespace; output captured as text unless told otherwise."""
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        return subprocess.run(self._exec(host, argv), timeout=timeout, **run_kwargs)

    # building

    def _in(self, host: str, *argv: str) -> None:
        _must(self._exec(host, argv))

    def _add_ns(self, host: str) -> None:
        name = self.ns(host)
        # our full pid is in the name, so one that exists was left by a dead process with that pid
        if name in netns_list():
            _ip("netns", "del", name)
        _must(["ip", "netns", "add", name])
        self._created.append(name)
        self._in(host, "ip", "link", "set", "lo", "up")

    def _veth(self, host: str, router_end: str, addr: str, prefixlen: int) -> None:
        """A veth from the router (end ``router_end``) to ``host`` (end ``eth0`` with ``addr``)."""
        peer = ["peer", "name", "eth0", "netns", self.ns(host)]
        _must(["ip", "-n", self.ns(ROUTER), "link", "add", router_end, "type", "veth", *peer])
        self._in(host, "ip", "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0")
        self._in(host, "ip", "link", "set", "eth0", "up")

    def build(self) -> None:
        """Create the namespaces, links, addresses, routes and the MASQUERADE rule."""
        for host in self._names:
            self._add_ns(host)
        r = self.ns(ROUTER)
        # the public LAN: a bridge in the router, one veth per public host
        _must(["ip", "-n", r, "link", "add", "br0", "type", "bridge"])
        _must(["ip", "-n", r, "addr", "add", f"{self.router_public_ip}/{self.public.prefixlen}", "dev", "br0"])
        _must(["ip", "-n", r, "link", "set", "br0", "up"])
        for host in ("pub1", "pub2"):
            end = f"v-{host}"
            self._veth(host, end, self.hosts[host], self.public.prefixlen)
            _must(["ip", "-n", r, "link", "set", end, "master", "br0"])
            _must(["ip", "-n", r, "link", "set", end, "up"])
            # no default route and none to the private LAN: the public hosts cannot dial priv
        # the private LAN: one veth, the router is priv's gateway
        self._veth("priv", "v-priv", self.hosts["priv"], self.private.prefixlen)
        _must(["ip", "-n", r, "addr", "add", f"{self.router_private_ip}/{self.private.prefixlen}", "dev", "v-priv"])
        _must(["ip", "-n", r, "link", "set", "v-priv", "up"])
        self._in("priv", "ip", "route", "add", "default", "via", self.router_private_ip)
        # routing plus source NAT, and nothing else: no DNAT, so no way in from the public side
        self._in(ROUTER, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-s", str(self.private), "-o", "br0", "-j", "MASQUERADE"]
        self._in(ROUTER, "iptables", *masquerade)

    # tearing down

    def _stop_started(self) -> None:
        """SIGTERM each started process group, wait up to 10 s in all, then SIGKILL what is left."""
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_WAIT_S
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
            # deleting the router's namespace removes the bridge and every veth with it
            for name in reversed(self._created):
                _ip("netns", "del", name)
            self._created.clear()
            _open_prefixes.discard(self.prefix)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def netns_list() -> list[str]:
    """The names of the machine's named network namespaces (``ip netns list``)."""
    r = _ip("netns", "list")
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """The processes running in namespace ``name`` (``ip netns pids``); empty when it is gone."""
    r = _ip("netns", "pids", name)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


@contextmanager
def nat_topology(tag: str, public: str = "198.18.0.0/24", private: str = "198.19.77.0/24") -> Iterator[Topology]:
    """Build a router masquerading ``private`` onto ``public``, with hosts pub1, pub2 and priv.

    Addresses: router ``.1`` on both LANs, pub1 ``.11`` and pub2 ``.12`` on ``public``, priv
    ``.2`` on ``private`` (default route via the router). Namespace names start with
    ``at<pid><tag>`` so parallel runs do not collide; ``tag`` tells topologies of one process
    apart. On exit, also on an exception, every process in the namespaces is stopped and the
    namespaces are deleted.
    """
    if not re.fullmatch(r"[A-Za-z0-9]{1,12}", tag):
        raise ValueError(f"tag must be 1-12 letters or digits, not {tag!r}")
    prefix = f"at{os.getpid()}{tag}"
    if prefix in _open_prefixes:
        raise ValueError(f"a topology tagged {tag!r} is already open in this process")
    topo = Topology(prefix, ipaddress.IPv4Network(public), ipaddress.IPv4Network(private))
    _open_prefixes.add(prefix)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()

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
from collections.abc import Iterator
from contextlib import contextmanager

from sysdeps import missing

from node.app.testbed.namespaces import Namespaces, ip, must, netns_list, netns_pids  # noqa: F401
from node.app.testbed.namespaces import unavailable as namespaces_unavailable

ROUTER = "router"
_open_prefixes: set[str] = set()


_ip, _must = ip, must


@functools.cache
def unavailable() -> str | None:
    """Why namespaces with a NAT router cannot be built on this machine, or None when they can.

    Tries the real thing once (a namespace with a MASQUERADE rule), since root alone is not
    enough: containers often forbid ``ip netns add`` or lack the kernel's nat table.
    """
    rule = ["-t", "nat", "-A", "POSTROUTING", "-s", "198.19.0.0/24", "-o", "lo", "-j", "MASQUERADE"]
    return missing("iproute2", "iptables") or namespaces_unavailable(
        probe=["iptables", *rule], needs="iptables' nat table"
    )


class Topology(Namespaces):
    """The namespaces of one ``nat_topology``, and the processes started in them.

    ``hosts`` maps ``pub1``, ``pub2`` and ``priv`` to their addresses; ``router_public_ip`` is
    the address under which the public hosts see ``priv``.
    """

    def __init__(self, prefix: str, public: ipaddress.IPv4Network, private: ipaddress.IPv4Network):
        super().__init__(prefix)
        self.public = public
        self.private = private
        self.router_public_ip = str(public[1])
        self.router_private_ip = str(private[1])
        self.hosts = {"pub1": str(public[11]), "pub2": str(public[12]), "priv": str(private[2])}
        self._names = {h: self.ns(h) for h in (ROUTER, *self.hosts)}

    # building

    def _in(self, host: str, *argv: str) -> None:
        self.inside(host, *argv)

    def _veth(self, host: str, router_end: str, addr: str, prefixlen: int) -> None:
        """A veth from the router (end ``router_end``) to ``host`` (end ``eth0`` with ``addr``)."""
        peer = ["peer", "name", "eth0", "netns", self.ns(host)]
        _must(["ip", "-n", self.ns(ROUTER), "link", "add", router_end, "type", "veth", *peer])
        self._in(host, "ip", "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0")
        self._in(host, "ip", "link", "set", "eth0", "up")

    def build(self) -> None:
        """Create the namespaces, links, addresses, routes and the MASQUERADE rule."""
        for host in self._names:
            self.add(host)
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

    def close(self) -> None:
        """Stop every process in the namespaces and delete them; safe to call again."""
        try:
            super().close()
        finally:
            _open_prefixes.discard(self.prefix)


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

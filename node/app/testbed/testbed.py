"""A testbed of hosts on one bridge, each with its own shaped uplink and downlink, in network namespaces.

    hub namespace: bridge br0 ── veth d<i> ─┐  (downlink of host i: tbf on d<i>, traffic towards the host)
    host namespace h<i>: eth0 198.18.0.(i+10)/24 (uplink: tbf on eth0, traffic from the host)

Rates are shaped with a token bucket (`tc qdisc ... tbf`) on each end of a host's veth, so a host sends no faster
than its uplink and receives no faster than its downlink, and transfers that share a link share its rate. The
kernel here has no `netem`: links add no latency (a round trip on the bridge is tens of microseconds), and results
say so. `measure` times a real TCP transfer between two hosts, so a run can show the configured rate is in force.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

from node.app.testbed.namespaces import Namespaces, must
from node.app.testbed.profiles import HostLink

HUB = "hub"
SUBNET = "198.18.0"  # RFC 2544 benchmarking range; hosts are .10 onwards
TBF_LATENCY_MS = 200  # how long a packet may queue in a bucket before it is dropped


def netem_missing() -> str | None:
    """Why links cannot be given latency here (`tc ... netem` refused in a probe namespace), or None when they
    can. The kernels these benchmarks ran on have no netem: their links have rates only, and results say so."""
    probe = f"atnetem{os.getpid()}"
    try:
        if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode != 0:
            return "network namespaces are refused"
        r = subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return None if r.returncode == 0 else f"tc netem is refused: {(r.stderr or r.stdout).strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"tc netem cannot be probed: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)


def tbf(rate_mbit: float) -> list[str]:
    """The `tc` arguments of a token bucket at `rate_mbit` Mbit/s: a burst of at least 64 KiB (a whole TSO segment,
    or the bucket would drop it) and a queue of TBF_LATENCY_MS."""
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 / 100))  # 10 ms at the rate
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


class Testbed(Namespaces):
    """Hosts h0..h(n-1) with the given links on one bridge (see the module docstring); `addresses[i]` is host i's
    IPv4 address. Build with `Testbed.start(links, tag)`; `close()` stops everything and removes the namespaces."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, links: Sequence[HostLink], tag: str = "tb"):
        """`links`: one HostLink per host (1 to 200 hosts); `tag`: letters and digits (up to 8) that tell testbeds
        of one process apart. Raises ValueError for a bad tag or host count. Nothing is created before `build`."""
        if not re.fullmatch(r"[A-Za-z0-9]{1,8}", tag):
            raise ValueError(f"tag must be 1-8 letters or digits, not {tag!r}")
        if not 1 <= len(links) <= 200:
            raise ValueError(f"a testbed has 1 to 200 hosts, not {len(links)}")
        super().__init__(f"at{os.getpid()}{tag}")
        self.links = list(links)
        self.addresses = [f"{SUBNET}.{10 + i}" for i in range(len(links))]

    @classmethod
    def start(cls, links: Sequence[HostLink], tag: str = "tb") -> Testbed:
        """A built testbed (closed again if building fails). Raises RuntimeError when a step is refused."""
        bed = cls(links, tag)
        try:
            bed.build()
        except BaseException:
            bed.close()
            raise
        return bed

    def host(self, i: int) -> str:
        """The host name of host i (its namespace is `ns(host(i))`)."""
        return f"h{i}"

    def build(self) -> None:
        """Create the hub with its bridge, then each host: namespace, veth, address, and both token buckets."""
        self.add(HUB)
        self.inside(HUB, "ip", "link", "add", "br0", "type", "bridge")
        self.inside(HUB, "ip", "link", "set", "br0", "up")
        for i, link in enumerate(self.links):
            h, end = self.host(i), f"d{i}"
            self.add(h)
            must(["ip", "-n", self.ns(HUB), "link", "add", end, "type", "veth", "peer", "name", "eth0", "netns",
                  self.ns(h)])  # fmt: skip
            self.inside(HUB, "ip", "link", "set", end, "master", "br0")
            self.inside(HUB, "ip", "link", "set", end, "up")
            self.inside(h, "ip", "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            self.inside(h, "ip", "link", "set", "eth0", "up")
            self.inside(h, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf(link.up_mbit))
            self.inside(HUB, "tc", "qdisc", "add", "dev", end, "root", *tbf(link.down_mbit))

    def measure(self, src: int, dst: int, megabytes: float = 4.0, timeout: float = 120.0) -> float:
        """Mbit/s of one TCP transfer of `megabytes` MB from host `src` to host `dst`, timed by the receiver from its
        first byte to the last. Raises RuntimeError when the transfer fails or takes longer than `timeout` s."""
        port = 5201
        receiver = self.popen(
            self.host(dst),
            [sys.executable, "-c", _RECEIVER, self.addresses[dst], str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 10
            while True:  # until the receiver listens
                r = self.run(self.host(src), [sys.executable, "-c", _SENDER, self.addresses[dst], str(port),
                                              str(int(megabytes * 1e6))], timeout=timeout)  # fmt: skip
                if r.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if r.returncode != 0:
                raise RuntimeError(f"transfer h{src} -> h{dst} failed: {r.stderr.strip()[-300:]}")
            out, err = receiver.communicate(timeout=timeout)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(5)
        try:
            return float(out.strip())
        except ValueError:
            raise RuntimeError(f"the receiver on h{dst} said {out.strip()!r} {err.strip()[-300:]!r}") from None


# a one-connection receiver and sender (standard library only); the receiver prints Mbit/s
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60); got, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b: break
    t0 = t0 or time.perf_counter(); got += len(b)
print(got * 8 / (time.perf_counter() - t0) / 1e6)
"""
_SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); s.settimeout(None)
n = int(sys.argv[3]); chunk = b"x" * (1 << 20)
while n > 0:
    s.sendall(chunk[:n]); n -= len(chunk)
s.close()
"""

"""Named mixes of link rates for the testbed and the simulator's link model: who has which uplink and downlink.

A profile is a list of (count, uplink Mbit/s, downlink Mbit/s) host classes; `hosts(profile)` expands it in order.
Rates are those of home, lab and cloud links: a cloud or lab machine symmetric at 100 Mbit/s or more, a home
fibre or cable line with a slower uplink, a laptop on a weak line. The kernel here shapes rates (`tc tbf`) but
adds no latency (no `netem`): links in a profile have rates only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostLink:
    """One host's access link: `up_mbit` and `down_mbit` in Mbit/s (10^6 bits per second), both > 0."""

    up_mbit: float
    down_mbit: float

    def __post_init__(self):
        if not (self.up_mbit > 0 and self.down_mbit > 0):
            raise ValueError(f"link rates must be positive Mbit/s, got {self.up_mbit}/{self.down_mbit}")

    @property
    def up_bytes_per_s(self) -> float:
        """The uplink in bytes per second."""
        return self.up_mbit * 1e6 / 8

    @property
    def down_bytes_per_s(self) -> float:
        """The downlink in bytes per second."""
        return self.down_mbit * 1e6 / 8


PROFILES: dict[str, list[tuple[int, float, float]]] = {
    # three hosts: a lab machine, a home fibre line, a laptop on home cable
    "home3": [(1, 100, 100), (1, 40, 100), (1, 10, 50)],
    # every host at 20 Mbit/s both ways (the rate DiLoCo-class training is measured at)
    "even20": [(3, 20, 20)],
    # seven hosts: two at 100 Mbit/s, four at 20, one laptop at 5
    "mixed7": [(2, 100, 100), (4, 20, 20), (1, 5, 5)],
}


def hosts(profile: str, nodes: int | None = None) -> list[HostLink]:
    """The links of profile `profile`'s hosts, in order; with `nodes`, the profile's classes repeated (in order,
    cycling) to `nodes` hosts, so a 7-host profile describes a 1,024-node swarm of the same mix. Raises
    ValueError for an unknown profile (naming the known ones) or `nodes` < 1."""
    if profile not in PROFILES:
        raise ValueError(f"unknown link profile {profile!r}; known: {', '.join(PROFILES)}")
    links = [HostLink(up, down) for count, up, down in PROFILES[profile] for _ in range(count)]
    if nodes is None:
        return links
    if nodes < 1:
        raise ValueError("a profile needs at least one node")
    return [links[i % len(links)] for i in range(nodes)]

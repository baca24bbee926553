"""What bounds atoll's utilization in docs/benchmarks/wan: run 0 of `gossip`, replayed by the link model on other
links, with each node's step and gap costs as its daemon measured them. From the repository root:

    PYTHONPATH=. .venv/bin/python docs/benchmarks/wan/what_bounds.py

Prints one Markdown row per set of links: the slowest node's wall time, then compute, communication and idle
seconds and utilization, averaged over the nodes.
"""

import json
import statistics

from node.algo.comm.links import replay
from node.app.testbed.profiles import HostLink, hosts
from node.config import load_swarm_config
from node.protocol.sim import Simulation

LINKS = {
    "home3 (as measured)": hosts("home3"),
    "the laptop at 40/100": [HostLink(100, 100), HostLink(40, 100), HostLink(40, 100)],
    "every host 100/100": [HostLink(100, 100)] * 3,
    "every host 1000/1000": [HostLink(1000, 1000)] * 3,
    "no transfer time": [HostLink(1e9, 1e9)] * 3,
}


def main() -> None:
    """Print the table (see the module docstring)."""
    res = json.load(open("docs/benchmarks/wan/results.json"))
    run = next(r for r in res["runs"] if r["system"] == "atoll" and r["method"] == "gossip" and r["repeat"] == 0)
    sim = Simulation(load_swarm_config("examples/wan3.yaml"), traces=True)
    traces, ids = sim.run().traces, sim.ids
    step = {p: n["compute"] / n["steps"] for p, n in zip(ids, run["nodes"])}
    idle = {p: n["idle"] / n["rounds"] for p, n in zip(ids, run["nodes"])}
    for name, links in LINKS.items():
        up = {p: link.up_bytes_per_s * res["efficiency"] for p, link in zip(ids, links)}
        down = {p: link.down_bytes_per_s * res["efficiency"] for p, link in zip(ids, links)}
        spent = [replay(traces, up, down, step, idle)[p] for p in ids]
        wall = max(s.end for s in spent)
        mean = {k: statistics.fmean(getattr(s, k) for s in spent) for k in ("compute", "comm", "idle", "utilization")}
        print(
            f"| {name} | {wall:.1f} | {mean['compute']:.1f} | {mean['comm']:.1f} | {mean['idle']:.1f} | "
            f"{mean['utilization']:.1%} |"
        )


if __name__ == "__main__":
    main()

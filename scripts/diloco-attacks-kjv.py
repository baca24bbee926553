"""DiLoCo under attack on the KJV language model, in the simulator (bit-identical to daemons: tests/test_engine.py).

examples/diloco3.yaml with four nodes, the fourth forging pseudo-gradients (25% of the swarm): sign flip, ALIE or
IPM, against DiLoCo over gossip (complete graph) with ClippedGossip and over the all-reduce with the coordinate-wise
median, each beside the plain mean. Prints the worst honest node's final perplexity per (averaging, aggregator,
attack) as a Markdown table; about two minutes a run on two cores.

    .venv/bin/python scripts/diloco-attacks-kjv.py [--defences gossip:clipped,all_reduce:median] [attack ...]
    # default: every defence below, attacks none sign_flip alie ipm
"""

import copy
import sys
import time
from pathlib import Path

import yaml

from node.config import SwarmConfig
from node.protocol.sim import Simulation

ROOT = Path(__file__).resolve().parents[1]
DEFENCES = [("gossip", "mean"), ("gossip", "clipped"), ("all_reduce", "mean"), ("all_reduce", "median")]


def worst(averaging: str, aggregator: str, attack: str) -> float:
    tree = yaml.safe_load((ROOT / "examples" / "diloco3.yaml").read_text())
    tree["nodes"] = 4
    tree["node"]["threads"] = 1
    tree["node"]["comm"].update(outer_average=averaging, topology="complete")
    tree["node"]["security"] = {"aggregator": aggregator}
    if attack != "none":
        tree["per_node"] = {3: {"security.attack": attack}}
    result = Simulation(SwarmConfig.model_validate(copy.deepcopy(tree))).run()
    return max(result.final_accuracies[:3])  # perplexity: the worst honest node is the highest


args = sys.argv[1:]
if args[:1] == ["--defences"]:
    DEFENCES = [tuple(d.split(":")) for d in args[1].split(",")]
    args = args[2:]
attacks = args or ["none", "sign_flip", "alie", "ipm"]
print("| averaging | aggregator | " + " | ".join(attacks) + " |")
print("|---|---|" + "---:|" * len(attacks))
for averaging, aggregator in DEFENCES:
    cells = []
    for attack in attacks:
        t0 = time.monotonic()
        cells.append(f"{worst(averaging, aggregator, attack):.3f}")
        print(f"  {averaging} {aggregator} {attack}: {cells[-1]} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    print(f"| {averaging} | {aggregator} | " + " | ".join(cells) + " |", flush=True)

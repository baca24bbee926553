"""Chaos: a 6-node swarm in which nodes are SIGKILLed and restarted at random (fixed seed,
bounded count). No checkpoint is ever corrupt, every restarted node resumes the round of its
last checkpoint, and the swarm finishes every round with useful models. Prints the recovery
time of each restart (restart to first completed round)."""

import json
import random
import time

import pytest
import torch
from helpers import atoll_node
from test_swarm import write_config

from node.net import checkpoint

# slow (about 2.5 min on 2 cores): run with `make test-all` or `pytest -m slow`
pytestmark = [pytest.mark.integration, pytest.mark.slow]
N, ROUNDS, KILLS, SEED = 6, 120, 4, 7


def test_random_kills_and_restarts_lose_nothing(tmp_path):
    rng = random.Random(SEED)
    cfgs = [
        write_config(
            tmp_path / f"n{i}.yaml",
            i,
            tmp_path,
            node_count=N,
            train={"rounds": ROUNDS, "local_steps": None, "local_seconds": 0.2},
            comm={"min_peers": N, "fetch_timeout": 4, "join_timeout": 90},
            net={"swarm": "chaos"},
        )
        for i in range(N)
    ]
    live = {}
    everyone = []
    recoveries = []
    try:
        live[0] = atoll_node(cfgs[0], log=tmp_path / "n0.log")
        everyone.append(live[0])
        boot = live[0].ready(90)["maddrs"][0]
        for i in range(1, N):
            live[i] = atoll_node(cfgs[i], "--initial-peers", boot, log=tmp_path / f"n{i}.log")
            everyone.append(live[i])
        for i in range(1, N):
            live[i].ready(90)
        for kill in range(KILLS):
            i = rng.randrange(N)
            victim = live[i]
            time.sleep(rng.uniform(0.5, 3.0))
            assert victim.proc.poll() is None, "the swarm finished before the chaos did: raise ROUNDS"
            victim.kill()
            model, _, state = checkpoint.load(tmp_path / f"n{i}" / "ckpt", torch.device("cpu"))  # never corrupt
            assert all(torch.isfinite(t).all() for t in model.values())
            t0 = time.monotonic()
            # rejoin through any other live member (the victim may be the bootstrap node itself)
            via = next(n.info["maddrs"][0] for j, n in sorted(live.items()) if j != i and n.proc.poll() is None)
            live[i] = atoll_node(cfgs[i], "--initial-peers", via, log=tmp_path / f"n{i}.r{kill}.log")
            everyone.append(live[i])
            info = live[i].ready(90)
            assert info["peer_id"] == victim.info["peer_id"] and info["start_round"] == state["round"]
            if state["round"] < ROUNDS:
                first = live[i].wait_event("round", 120)
                assert first["round"] == state["round"] + 1  # resumed its round, not round 0
                recoveries.append(round(time.monotonic() - t0, 2))
        finals = {i: n.wait_event("done", 300) for i, n in live.items()}
        assert all(f["round"] == ROUNDS for f in finals.values()), finals
        assert all(f["accuracy"] > 0.8 for f in finals.values()), finals
        for i in range(N):
            _, _, state = checkpoint.load(tmp_path / f"n{i}" / "ckpt", torch.device("cpu"))
            assert state["round"] == ROUNDS
        print(f"\nchaos: {KILLS} kills, recovery seconds (restart -> first completed round): {recoveries}")
        (tmp_path / "recovery.json").write_text(json.dumps(recoveries))
    finally:
        for n in everyone:
            n.stop()

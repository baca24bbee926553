"""Elastic join (node/net/join.py): a node that starts while its swarm is far past round 0, or that stalls, downloads
a member's newest join state (checked against the donor's signed digest) and mixes from its next round, while the
running members never wait for it. Real daemons, real DHT and gRPC on 127.0.0.1.

Found in the field: a third node started at round 252 of a 2-node swarm trained alone for about 330 rounds (69%
accuracy while the swarm was at 96%), and the running nodes waited fetch_timeout for its snapshots."""

import os
import signal

import yaml
from helpers import atoll_node

FETCH_TIMEOUT = 10
NODE = {
    "threads": 1,
    "model": {"width": 32},
    "train": {"rounds": 100_000, "local_steps": 300},  # about a second a round; runs until the test stops it
    "comm": {"fetch_timeout": FETCH_TIMEOUT, "join_timeout": 120, "topology": "ring", "min_peers": 3},
    "net": {"swarm": "join"},
    "checkpoint_rounds": 1000,
}


def _scores(proc) -> dict[int, float]:
    return {e["round"]: e["score"] for e in proc.seen if e.get("event") == "round"}


def _latest_round(proc) -> int:
    """The round of the newest event `proc` printed so far (events not yet read are read now)."""
    while not proc.events.empty():
        proc.seen.append(proc.events.get_nowait())
    return max(_scores(proc))


def test_a_late_joiner_catches_up_and_a_stalled_node_too(tmp_path):
    swarm = tmp_path / "swarm.yaml"
    swarm.write_text(yaml.safe_dump({"nodes": 4, "node": NODE}))
    procs, boot = [], []

    def start(i):
        extra = ["--set", f"node_index={i}", "--identity", str(tmp_path / f"{i}.key")]
        extra += ["--checkpoint-dir", str(tmp_path / f"ckpt{i}"), *boot]
        procs.append(atoll_node(swarm, *extra, log=tmp_path / f"node{i}.log"))
        return procs[-1]

    try:
        first = start(0)
        boot += ["--initial-peers", first.wait_event("joinable", timeout=120)["maddrs"][0]]
        for i in (1, 2):
            start(i)
        for p in procs:
            p.ready(timeout=120)
        first.wait_event("round", timeout=180, predicate=lambda e: e["round"] >= 10)

        joiner = start(3)
        caught = joiner.wait_event("caught_up", timeout=180)
        assert caught["was"] == 0 and caught["round"] >= 10, caught
        rounds = [joiner.wait_event("round", timeout=120) for _ in range(6)]
        assert rounds[0]["round"] == caught["round"] + 1
        assert rounds[0]["mixed"] >= 1, rounds[0]  # it mixes from its first round
        # within 5 rounds, within 2 points of the swarm's accuracy at the same round
        for p in procs[:3]:
            p.wait_event("round", timeout=120, predicate=lambda e: e["round"] >= rounds[-1]["round"])
        r = rounds[4]["round"]
        swarm_score = sum(_scores(p)[r] for p in procs[:3]) / 3
        assert rounds[4]["score"] >= swarm_score - 0.02, (rounds[4]["score"], swarm_score)
        # no running node waited for it: a round that waited for its snapshots would take FETCH_TIMEOUT
        during = [
            e["seconds"]
            for p in procs[:3]
            for e in p.seen
            if e.get("event") == "round" and caught["swarm_round"] - 3 <= e["round"] <= r
        ]
        assert during and max(during) < FETCH_TIMEOUT / 2, during

        # a node frozen for a while (SIGSTOP): its neighbours wait one fetch_timeout, then leave it out as far behind
        # and run on; when it wakes, it finds the swarm far ahead and catches up again
        stalled = procs[1]
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            ahead = _latest_round(first)
            first.wait_event("round", timeout=120, predicate=lambda e: e["round"] >= ahead + 12)
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        again = stalled.wait_event("caught_up", timeout=120)
        assert again["round"] - again["was"] > 3, again
        after = stalled.wait_event("round", timeout=120, predicate=lambda e: e["round"] == again["round"] + 1)
        assert after["mixed"] >= 1, after
    finally:
        for p in procs:
            p.stop()


def test_a_join_state_is_checked_before_use():
    import pytest
    import torch

    from node.net.join import _join_like
    from p2pd.errors import ReasonedError

    own = {"w": torch.zeros(3, 2), "n": torch.tensor(4)}
    accept = _join_like(own)
    good = {"w": torch.ones(3, 2), "n": torch.tensor(9), "outer/momentum/w": torch.ones(3, 2)}
    assert accept(good) is good
    for bad, reason in (
        ({**good, "w": torch.ones(2, 3)}, "incompatible"),
        ({**good, "outer/momentum/w": torch.full((3, 2), float("nan"))}, "non_finite"),
        ({k: v for k, v in good.items() if k != "n"}, "incompatible"),
    ):
        with pytest.raises(ReasonedError) as e:
            accept(bad)
        assert e.value.reason == reason

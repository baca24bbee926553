"""Streaming DiLoCo (node/protocol/rounds/streaming.py): fragments of near-equal size, each synchronised once a
round on a stagger, so a node's transfers are spread over the round at the same total bytes and quality; the
settings it cannot use are one clear error. (Daemons equal the simulator with a transfer running during the
inner steps: tests/test_engine.py.)"""

from collections import defaultdict

import pytest

from node.algo.comm.allreduce import fragments
from node.algo.comm.links import Fetch
from node.config import ConfigError, NodeConfig, SwarmConfig, load_config
from node.protocol.allreduce import STRIDE
from node.protocol.sim import Simulation
from node.protocol.train import RoundStats


def test_fragments_deal_tensors_into_near_equal_loads():
    sizes = {"emb": 1000, "a": 400, "b": 400, "c": 300, "d": 300, "bias": 10}
    parts = fragments(sizes, 2)
    assert sorted(k for p in parts for k in p) == sorted(sizes)
    loads = [sum(sizes[k] for k in p) for p in parts]
    assert max(loads) - min(loads) <= 300, loads
    assert fragments(dict(reversed(list(sizes.items()))), 2) == parts  # the same cut on every node
    with pytest.raises(ValueError, match="fragments"):
        fragments({"w": 5}, 2)


def test_parts_of_a_round_add_up():
    a, b = RoundStats(2.0, 2, 64, 1.0), RoundStats(5.0, 1, 32, 0.5)
    assert a + b == RoundStats(3.0, 3, 96, 1.5)


def _sim(**comm):
    tree = {"threads": 1, "model": {"width": 64}, "train": {"rounds": 6, "local_steps": 20}, "data": {"alpha": 0.3}}
    tree["comm"] = {"algorithm": "diloco", "outer_average": "all_reduce", **comm}
    return Simulation(SwarmConfig(nodes=4, node=NodeConfig.model_validate(tree)), traces=True).run()


def _per_sync(result) -> dict:
    """Bytes fetched by all nodes per (round, fragment) synchronisation."""
    out = defaultdict(int)
    for ops in result.traces.values():
        for op in ops:
            if isinstance(op, Fetch):
                for _, (_kind, r, step), size in op.items:
                    out[(r, step // STRIDE)] += size
    return out


def test_fragments_spread_a_rounds_transfer_at_the_same_bytes_and_quality():
    whole, streamed = _sim(), _sim(fragments=2)  # the MLP's two 64x64 layers: two halves
    per_whole, per_part = _per_sync(whole), _per_sync(streamed)
    assert len(per_part) == 2 * len(per_whole)  # two synchronisations a round instead of one
    assert max(per_part.values()) < 0.6 * max(per_whole.values())
    assert streamed.bytes_sent == pytest.approx(whole.bytes_sent, rel=0.1)
    assert min(streamed.final_accuracies) > min(whole.final_accuracies) - 0.05, (streamed, whole)


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"comm.algorithm": "diloco", "comm.fragments": 2}, "outer_average all_reduce"),
        ({"comm.algorithm": "diloco", "comm.outer_average": "all_reduce", "comm.fragments": 3}, "multiple"),
        (
            {
                "comm.algorithm": "diloco",
                "comm.outer_average": "all_reduce",
                "comm.fragments": 2,
                "comm.sync_delay": 6,
            },
            "at most",
        ),
        (
            {
                "comm.algorithm": "diloco",
                "comm.outer_average": "all_reduce",
                "comm.sync_delay": 1,
                "train.local_steps": None,
                "train.local_seconds": 2,
            },
            "local_seconds",
        ),
    ],
)
def test_settings_streaming_cannot_use_are_one_clear_error(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, sets)

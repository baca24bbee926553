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


def _protocol(comm: dict):
    from node.protocol.rounds.diloco import DiLoCoRounds
    from node.protocol.worker import Worker

    tree = {
        "threads": 1,
        "model": {"width": 16},
        "train": {"local_steps": 10},
        "comm": {"algorithm": "diloco", **comm},
    }
    cfg = NodeConfig.model_validate(tree)
    worker = Worker(cfg)
    return cfg, worker, lambda: DiLoCoRounds(cfg, worker, exchange=None)


STREAMED = {"outer_average": "all_reduce", "fragments": 2, "sync_delay": 1, "codec": "int8", "error_feedback": True}


@pytest.mark.parametrize("comm", [{}, STREAMED], ids=["gossip", "streamed"])
def test_a_checkpoint_keeps_the_outer_optimizer_state(tmp_path, comm):
    """Found reading the code: a resumed DiLoCo node started its outer momentum (and streamed fragments) afresh."""
    import torch

    from node.net import checkpoint

    cfg, worker, build = _protocol(comm)
    rounds = build()
    gen = torch.Generator().manual_seed(0)
    like = {k: v for k, v in worker.state().items() if v.is_floating_point()}
    noise = lambda: {k: torch.randn(v.shape, generator=gen) for k, v in like.items()}  # noqa: E731
    if rounds.stream is None:
        rounds.momentum = noise()
    else:
        rounds.stream.shared, rounds.stream.since = noise(), [7, 3]
        rounds.stream.momentum = [{k: v for k, v in noise().items() if k in part} for part in rounds.stream.parts]
        rounds.allreduce.residual = {1: torch.randn(40, generator=gen)}
    saved = {k: v.clone() for k, v in rounds.outer_tensors().items()}
    checkpoint.save(tmp_path, *checkpoint.capture(worker, "peer", 3, 0.5))

    _, fresh, build_again = _protocol(comm)
    assert checkpoint.resume(tmp_path, fresh, "peer")[0] == 3  # before the protocol exists, as in the daemon
    back = build_again().outer_tensors()
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)


def test_outer_state_for_another_model_is_refused():
    import torch

    _, worker, build = _protocol({})
    rounds = build()
    with pytest.raises(ValueError, match="does not fit"):
        rounds.load_outer({"momentum/0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="does not keep"):
        rounds.load_outer({"shared/0.weight": torch.zeros(3)})


def test_a_rolled_back_round_puts_the_outer_state_back():
    """Found in review: a round whose average held Inf left an Inf outer momentum behind the rollback, so every
    redo failed the same way and the node ended Diverged."""
    import torch

    _, worker, build = _protocol({})
    rounds = build()
    like = {k: v for k, v in worker.state().items() if v.is_floating_point()}
    rounds.momentum = {k: torch.ones_like(v) for k, v in like.items()}
    worker.keep_good_state()
    rounds.momentum = {k: torch.full_like(v, float("inf")) for k, v in like.items()}
    worker.roll_back(3, "model_after_mixing")
    assert all(torch.equal(v, torch.ones_like(v)) for v in rounds.momentum.values())

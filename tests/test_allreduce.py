"""DiLoCo's all-reduce over signed snapshots (node/algo/comm/allreduce.py, node/protocol/allreduce.py): the groups,
slices and reductions, a slice of another group refused, and in the simulator the exact average of one group at
2 (n - 1) / n of a vector per member. (Daemons equal the simulator bit for bit: tests/test_engine.py.)"""

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from node.algo.comm.allreduce import bounds, groups, reduce_slice, tag
from node.config import ConfigError, NodeConfig, SwarmConfig, load_config
from node.protocol.allreduce import SlicedAllReduce, _check
from node.protocol.sim import Simulation
from p2pd.codecs import decompress
from p2pd.errors import ReasonedError


def test_groups_cover_the_swarm_once_and_change_every_round():
    ids = [f"p{i:02d}" for i in range(10)]
    for r in range(3):
        cut = groups(ids, 4, seed=1, round_=r)
        assert sorted(p for g in cut for p in g) == ids
        assert sorted(len(g) for g in cut) == [3, 3, 4]
    assert groups(ids, 4, 1, 0) != groups(ids, 4, 1, 1)
    assert groups(ids[:4], 4, 1, 0) == [ids[:4]]  # a swarm that fits is one group: DiLoCo as published


def test_slices_cover_the_vector_and_reductions_are_the_rules():
    assert bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([100.0, -100.0])
    assert torch.equal(reduce_slice([a, b], [1, 3]), torch.tensor([2.5, 5.0]))  # weighted by samples
    assert torch.equal(reduce_slice([a, b, c], [1, 1, 1], "median"), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="krum"):
        reduce_slice([a], [1], "krum")
    with pytest.raises(ValueError, match="weights"):
        reduce_slice([a, b], [0, 0])


def test_a_slice_cut_for_another_group_or_length_is_refused():
    group = ["a", "b", "c"]
    accept = _check(tag(group, 10), {4}, reduced=False)
    good = {"g": torch.zeros(4), "w": torch.tensor([3.0], dtype=torch.float64), "tag": torch.tensor([tag(group, 10)])}
    assert accept(good) is good
    for bad in (
        good | {"tag": torch.tensor([tag(["a", "b"], 10)])},  # another group
        good | {"tag": torch.tensor([tag(group, 10, models=True)])},  # models, not pseudo-gradients
        good | {"g": torch.zeros(5)},
        good | {"w": torch.tensor([float("nan")], dtype=torch.float64)},
        good | {"extra": torch.zeros(1)},
    ):
        with pytest.raises(ReasonedError) as e:
            accept(bad)
        assert e.value.reason == "incompatible"


class _Board:
    """Members' exchanges over one dict: a unit of the slicing, not of the network (the simulator and daemons run
    the real exchanges below and in tests/test_engine.py)."""

    def __init__(self):
        self.held, self.cond = {}, threading.Condition()

    def exchange(self, me, everyone):
        board = self

        class Exchange:
            def members(self, r):
                return [SimpleNamespace(peer_id=p) for p in everyone if p != me]

            def publish(self, key, tensors, **record):
                with board.cond:
                    board.held[(me, key)] = dict(tensors)
                    board.cond.notify_all()

            def fetch_many(self, peers, key, accept):
                with board.cond:
                    board.cond.wait_for(lambda: all((p, key) in board.held for p in peers), timeout=10)
                    return {p: accept(decompress(board.held[(p, key)])) for p in peers if (p, key) in board.held}

        e = Exchange()
        e.me = me
        return e


def test_members_weighted_by_samples_take_the_same_average():
    cfg = NodeConfig.model_validate({"comm": {"algorithm": "diloco", "outer_average": "all_reduce"}})
    board, ids = _Board(), ["a", "b", "c"]
    vec = {"a": torch.arange(7.0), "b": torch.full((7,), 10.0), "c": torch.full((7,), -2.0)}
    weight = {"a": 1.0, "b": 3.0, "c": 2.0}  # b ran three times a's inner steps

    def member(p):
        end, ex = SlicedAllReduce(cfg.comm, cfg.security, seed=0), board.exchange(p, ids)
        group, several = end.plan(ex, 0)
        assert (group, several) == (ids, False)
        return end.run(ex, 0, group, vec[p], weight[p], several)

    with ThreadPoolExecutor(3) as pool:
        got = dict(zip(ids, pool.map(member, ids)))
    want = sum(vec[p] * weight[p] for p in ids) / 6
    assert torch.allclose(got["a"].vector, want)
    assert torch.equal(got["a"].vector, got["b"].vector) and torch.equal(got["a"].vector, got["c"].vector)
    assert got["a"].answered == ["b", "c"]


def _sim(nodes: int, **comm):
    tree = {"threads": 1, "model": {"width": 32}, "train": {"rounds": 4, "local_steps": 10}, "data": {"alpha": 0.3}}
    tree["comm"] = {"algorithm": "diloco", **comm}
    return Simulation(SwarmConfig(nodes=nodes, node=NodeConfig.model_validate(tree)), digests=True).run()


def test_one_group_takes_the_exact_average_at_a_butterflys_bytes():
    gossip = _sim(4, topology="complete")
    reduce = _sim(4, outer_average="all_reduce")
    assert reduce.final_accuracies == pytest.approx(gossip.final_accuracies, abs=0.01)
    assert len({tuple(d) for d in reduce.digests.values()}) == 1  # every member the same bits
    # complete gossip fetches 3 models a member; the all-reduce 2 * 3/4 of one
    assert reduce.bytes_sent / gossip.bytes_sent == pytest.approx(0.5, rel=0.05)


def test_several_groups_train_as_far_as_ring_gossip_on_fewer_bytes():
    ring = _sim(6)
    groups_of_3 = _sim(6, outer_average="all_reduce", allreduce_group=3)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(groups_of_3.final_accuracies) > mean(ring.final_accuracies) - 0.03, (groups_of_3, ring)
    assert groups_of_3.bytes_sent < ring.bytes_sent


@pytest.mark.parametrize(
    "sets, words",
    [
        ({"comm.outer_average": "all_reduce"}, "for comm.algorithm diloco"),
        (
            {"comm.algorithm": "diloco", "comm.outer_average": "all_reduce", "security.aggregator": "krum"},
            "whole updates",
        ),
        (
            {"comm.algorithm": "diloco", "comm.outer_average": "all_reduce", "comm.allreduce_group": 12},
            "keep_snapshots",
        ),
    ],
)
def test_settings_an_all_reduce_cannot_use_are_one_clear_error(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, sets)


def test_sparse_codecs_gather_whole_coded_vectors_once():
    comm = {"algorithm": "diloco", "outer_average": "all_reduce", "codec": "topk2bit", "topk_ratio": 0.25}
    cfg = NodeConfig.model_validate({"comm": {**comm, "int8_block": 64, "error_feedback": True}})
    board, ids = _Board(), ["a", "b", "c"]
    gen = torch.Generator().manual_seed(0)
    vec = {p: torch.randn(1024, generator=gen) for p in ids}

    def member(p):
        end, ex = SlicedAllReduce(cfg.comm, cfg.security, seed=0), board.exchange(p, ids)
        group, several = end.plan(ex, 0)
        return end.run(ex, 0, group, vec[p], 1.0, several), end.residual[0]

    with ThreadPoolExecutor(3) as pool:
        got = dict(zip(ids, pool.map(member, ids)))
    assert len(board.held) == 3  # one snapshot each: no slices, no reduced slices
    a, b, c = (got[p][0].vector for p in ids)
    assert torch.equal(a, b) and torch.equal(a, c)
    # each member's error feedback keeps what its codec dropped: the sent part plus it is the vector
    sent = {p: vec[p] - got[p][1] for p in ids}
    assert torch.allclose(a, sum(sent.values()) / 3, atol=1e-6)
    assert all((sent[p] != 0).float().mean() <= 0.26 for p in ids)

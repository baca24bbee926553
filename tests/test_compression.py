"""Compressed gossip (node/protocol/compression.py): CHOCO-SGD's error feedback keeps consensus
where compressing without it does not, copies stay in step across restarts and redone rounds,
and peers that cannot use each other's codec do not exchange."""

import logging
from types import SimpleNamespace

import pytest
import torch

from node.config import CommConfig, ConfigError, NodeConfig, SwarmConfig, load_config
from node.net.view import MemberView
from node.protocol.compression import CompressedGossip, record_codec
from node.protocol.exchange.memory import Board, MemoryExchange
from node.protocol.sim import Simulation

IDS = ["a", "b", "c", "d"]


def ring(i: int) -> list[str]:
    return [IDS[(i - 1) % 4], IDS[(i + 1) % 4]]


def consensus(codec: str, feedback: bool, steps: int, ratio: float = 0.1, gamma: float = 0.2, restart=None):
    """Pure gossip of fixed models on a 4-ring (weights 1/3): the consensus distance
    (max over nodes of |x_i - mean| / |x_0 - mean| at the start) after `steps`, the mean's drift,
    and each node's CompressedGossip. `restart` = (node, step): that node starts afresh."""
    comm = CommConfig(codec=codec, error_feedback=feedback, topk_ratio=ratio, consensus_step=gamma)
    g = torch.Generator().manual_seed(0)
    xs = [{"w": torch.randn(4096, generator=g) * (i + 1), "n": torch.tensor(i)} for i in range(4)]
    mean0 = torch.stack([x["w"] for x in xs]).mean(0)
    spread0 = max(float((x["w"] - mean0).norm()) for x in xs)
    board = Board(IDS, [1] * 4)
    ex = [MemoryExchange(board, p) for p in IDS]
    nodes = [CompressedGossip(comm) for _ in IDS]
    shared_init = {"w": torch.zeros(4096), "n": torch.tensor(0)}  # the swarm's one seeded init
    for i in range(4):
        nodes[i].begin(0, shared_init)  # then each trained to its own x_i
    for s in range(steps):
        if restart is not None and s == restart[1]:
            i = restart[0]
            nodes[i] = CompressedGossip(comm)
            nodes[i].begin(s, xs[i])
        for i in range(4):
            nodes[i].publish(ex[i], s, 0, xs[i])
        new = []
        for i in range(4):
            seen = nodes[i].gather(ex[i], ring(i), s, 0, xs[i])
            assert set(seen) == set(ring(i))
            mixed = {k: (xs[i][k] + sum(v[k] for v in seen.values())) / 3 for k in ("w",)}
            new.append({**xs[i], **nodes[i].blend(xs[i], mixed)})
        xs = new
    mean = torch.stack([x["w"] for x in xs]).mean(0)
    spread = max(float((x["w"] - mean).norm()) for x in xs) / spread0
    return spread, float((mean - mean0).norm() / mean0.norm()), nodes, board


def test_error_feedback_reaches_consensus_where_plain_compression_does_not():
    """top-k at 10% with error feedback (CHOCO) drives the models to their average; top-k of
    the change without it loses what it drops and stalls; both keep the average (W symmetric)."""
    with_ef, drift, nodes, board = consensus("topk", True, 150)
    without, _, _, _ = consensus("topk", False, 150)
    assert with_ef < 1e-3, with_ef
    assert without > 0.3, without
    assert drift < 1e-5
    assert all(n.resyncs == 0 for n in nodes)  # started together: no estimate ever fetched
    exact, _, _, _ = consensus("none", False, 150, gamma=1.0)
    assert exact < 1e-3
    int8, _, _, _ = consensus("int8", True, 150, gamma=1.0)
    assert int8 < 1e-3


def test_a_restarted_node_is_resynced_once_then_followed_by_deltas():
    spread, _, nodes, board = consensus("topk", True, 150, restart=(2, 40))
    assert spread < 1e-3  # still converges
    # b and d (node 2's ring neighbours) fetched its new lineage's estimate once; the restarted
    # node, which lost the shared init, fetched each of its neighbours' once; a never neighbours it
    assert [n.resyncs for n in nodes] == [0, 1, 2, 1]
    assert board.refused == {}


def test_a_redone_round_starts_a_new_lineage():
    comm = CommConfig(codec="int8", error_feedback=True)
    board = Board(["a", "b"], [1, 1])
    ea, eb = MemoryExchange(board, "a"), MemoryExchange(board, "b")
    a, b = CompressedGossip(comm), CompressedGossip(comm)
    x = {"w": torch.randn(2048)}
    a.begin(0, x)
    b.begin(0, x)
    a.publish(ea, 0, 0, {"w": x["w"] + 1})
    first = a.choco.epoch
    assert set(b.gather(eb, ["a"], 0, 0, x)) == {"a"} and b.resyncs == 0
    a.publish(ea, 0, 0, {"w": x["w"] + 2})  # round 0 rolled back and done again
    assert a.choco.epoch != first
    seen = b.gather(eb, ["a"], 0, 0, x)
    assert b.resyncs == 1
    assert torch.allclose(seen["a"]["w"], x["w"] + 2, atol=0.05)  # the redone model, not the sum of both


def test_config_and_record_codec():
    assert record_codec(CommConfig(codec="topk", error_feedback=True)) == "topk+ef"
    for bad, needle in (
        ({"comm": {"error_feedback": True}}, "needs a comm.codec"),
        ({"comm": {"codec": "int8", "exchange": "logits"}}, "apply to gossip of models"),
        ({"comm": {"codec": "int8", "algorithm": "modest"}}, "apply to gossip of models"),
        ({"comm": {"codec": "topk", "topology": "random"}}, "not random"),
        ({"comm": {"codec": "int8", "error_feedback": True, "keep_snapshots": 15}}, "keep_snapshots must be <= 14"),
    ):
        with pytest.raises((ValueError, ConfigError), match=needle):
            NodeConfig.model_validate(bad)
    with pytest.raises(ConfigError, match="comm.codec"):
        load_config(None, {"comm.codec": "zstd"})


def test_a_peer_whose_codec_cannot_be_used_is_named_once(caplog):
    me = SimpleNamespace(comm=CommConfig(codec="int8"), me="self", _codec_warned=set())
    fits = lambda codec: MemberView.codec_fits(me, SimpleNamespace(peer_id=f"peer-{codec}", codec=codec))  # noqa: E731
    with caplog.at_level(logging.WARNING):
        assert fits("int8") and fits("fp16") and fits("none")  # decodable models
        assert not fits("zstd") and not fits("zstd")  # unknown: refused, said once
        assert not fits("topk+ef")  # deltas where we send models
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "cannot decode" in said[0] and "CHOCO deltas" in said[1]


def test_a_corrupted_compressed_delta_is_refused_counted_and_resynced():
    """A delta flipped on the wire is refused by the daemons' decoder (and counted); the
    receivers lost a step of that node's lineage, so the next step they fetch its estimate once
    and go on: every node finishes about where the same run without the fault does."""
    from node.protocol.exchange.memory import Faults

    tree = {"comm": {"codec": "int8", "error_feedback": True}, "train": {"rounds": 6, "local_steps": 5}, "threads": 1}
    probe = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree)))
    sim = Simulation(
        SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree)), faults=Faults().corrupt(probe.ids[0], 2)
    )
    res = sim.run()
    assert sum(res.refused.values()) == 2 and set(res.refused) <= {"digest_mismatch", "bad_codec"}
    assert [e.protocol.compression.resyncs for e in sim.engines] == [0 if p == probe.ids[0] else 1 for p in sim.ids]
    clean = probe.run()
    assert len(res.final_accuracies) == 3 and min(res.final_accuracies) >= min(clean.final_accuracies) - 0.05


def test_choco_bookkeeping_is_pure_and_draws_lineages_from_its_own_generator():
    """node/algo/choco.py without any exchange: a node's delta applied to its neighbour's copy gives
    the neighbour the same estimate, views are own + (x̂_j - x̂_i), and a restart's lineage comes
    from the generator passed in, never from the global random stream."""
    import random

    from node.algo.choco import START, Choco

    same = lambda sd: {k: v.clone() for k, v in sd.items()}  # noqa: E731 - a lossless codec
    x = {"w": torch.arange(6, dtype=torch.float32)}
    a, b = (Choco(same, same, feedback=True, gamma=1.0, rng=random.Random(7)) for _ in range(2))
    a.begin(0, x)
    b.begin(0, x)
    out = a.outgoing(0, 0, {"w": x["w"] + 1})
    assert a.at == START  # nothing changes before the commit
    a.commit(out)
    assert b.receive(0, 0, {"a": (out.epoch, out.prev, out.delta)}) == []  # the common lineage: no resync
    assert torch.equal(b.copies["a"].tensors["w"], a.mine["w"])
    view = b.views(["a"], (0, 0), x)["a"]["w"]
    assert torch.equal(view, x["w"] + 1)  # lossless, gamma 1: plain gossip sees a's model
    state = random.getstate()
    resumed = Choco(same, same, feedback=True, gamma=1.0, rng=random.Random(7))
    resumed.begin(5, x)  # a resumed node: a lineage of its own
    assert resumed.epoch == random.Random(7).getrandbits(62) and random.getstate() == state

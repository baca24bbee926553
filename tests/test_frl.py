"""FRL (node/algo/frl.py, node/protocol/rounds/ranks.py): edge rankings of a shared random network, one vote
per node; a ranking that is not a permutation or does not fit is refused with a reason."""

import pytest
import torch

from node.algo import frl
from node.config import NodeConfig, SwarmConfig
from node.protocol.rounds.ranks import RankRounds
from node.protocol.sim import Simulation
from node.protocol.worker import Worker
from p2pd.errors import ReasonedError

FRL = {
    "comm": {"exchange": "ranks", "topology": "ring", "final_merge": True},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "batch_size": 32},
    "model": {"family": "mlp", "width": 256},  # supermasks need room: a wide random network
    "train": {"rounds": 12, "local_steps": 10},
    "data": {"partition": "iid"},
    "threads": 1,
}


def test_one_reversed_vote_moves_each_edge_by_at_most_one_vote():
    g = torch.Generator().manual_seed(0)
    n = 1000
    honest = [frl.ranking(torch.randn(n, generator=g)) for _ in range(4)]
    reversed_one = frl.ranking(-frl.positions(honest[0]).float())
    assert torch.equal(reversed_one, honest[0].flip(0))
    total = lambda rs: torch.stack([frl.positions(r) for r in rs]).sum(0)  # noqa: E731
    moved = (total(honest + [reversed_one]) - total(honest + [honest[0]])).abs()
    assert int(moved.max()) <= n - 1  # one vote's weight
    agreed = [honest[0]] * 4
    assert torch.equal(frl.vote(agreed + [reversed_one]), honest[0])  # four agreeing votes outvote it


def test_rankings_that_are_not_permutations_or_do_not_fit_are_refused():
    w = Worker(NodeConfig.model_validate(FRL))
    rounds = RankRounds(w.cfg, w, exchange=None)
    accept = rounds._accept()
    good = rounds.rankings()
    assert accept(good) is good
    name = rounds.names[0]
    dup = good[name].clone()
    dup[1] = dup[0]
    cases = {
        "duplicate entries": ({**good, name: dup}, "not_a_permutation"),
        "out of range": ({**good, name: good[name] + 1}, "not_a_permutation"),
        "floats": ({**good, name: good[name].float()}, "not_a_permutation"),
        "wrong length": ({**good, name: good[name][:-1]}, "incompatible"),
        "another model": ({k + "x": v for k, v in good.items()}, "incompatible"),
        "a scalar": ({**good, name: torch.tensor(3, dtype=torch.int32)}, "incompatible"),
    }
    for what, (theirs, reason) in cases.items():
        with pytest.raises(ReasonedError) as e:
            accept(theirs)
        assert e.value.reason == reason, what


def test_frl_learns_in_the_simulator_and_the_final_vote_agrees():
    """Scores train (the weights never move), rankings are voted on, and the final merge gives
    every node the same ranking: one model, well above chance."""
    sim = Simulation(SwarmConfig(nodes=4, node=NodeConfig.model_validate(FRL)))
    weights = {k: v.clone() for k, v in sim.workers[0].model.state_dict().items() if k.endswith("weight")}
    res = sim.run()
    # chance is 0.1; after 12 rounds the vote moves by +-0.05 from round to round, and CPUs with
    # other float kernels land on either side of 0.7 (0.693 on a fresh 2-core machine, above 0.7
    # on CI's): the bar is "learned", with room for the machine
    assert len(set(res.final_accuracies)) == 1 and res.final_accuracies[0] > 0.6, res.final_accuracies
    assert all(torch.equal(sim.workers[0].model.state_dict()[k], v) for k, v in weights.items())
    assert sum(res.refused.values()) == 0
    # what travelled: int32 rankings of the scores (4 bytes an edge), no weights
    edges = sum(p.numel() for k, p in sim.workers[0].model.named_parameters() if k.endswith("scores"))
    assert res.bytes_sent > 4 * 2 * 12 * 4 * edges  # 4 nodes x 2 neighbours x 12 rounds, int32 edges
    assert all(w.state().keys() == {k for k in w.state() if k.endswith(".scores")} for w in sim.workers)


def test_frl_config_is_checked():
    for sets, needle in (
        ({"security": {"aggregator": "krum"}}, "votes on rankings"),
        ({"comm": {"exchange": "ranks", "algorithm": "modest"}}, "votes on rankings"),
    ):
        tree = {**FRL, **sets, "comm": {**FRL["comm"], **sets.get("comm", {})}}
        with pytest.raises(ValueError, match=needle):
            NodeConfig.model_validate(tree)

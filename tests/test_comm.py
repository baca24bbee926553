"""Who talks to whom and how models mix: topologies, Metropolis-Hastings weights, renormalisation,
gossip schedules, MoDeST's sample, variance-corrected averaging."""

import pytest
import torch

from node.algo.comm.mixing import metropolis_hastings, mix, renormalise
from node.algo.comm.topology import degree, neighbours


def test_ring_and_complete():
    ids = [f"p{i}" for i in range(5)]
    assert neighbours(ids, "p0", "ring") == ["p1", "p4"]
    assert neighbours(list(reversed(ids)), "p0", "ring") == ["p1", "p4"]  # order-free
    assert neighbours(["p0", "p1"], "p0", "ring") == ["p1"]
    assert neighbours(["p0"], "p0", "ring") == []
    assert degree(ids, "p3", "complete") == 4
    with pytest.raises(ValueError):
        neighbours(ids, "p0", "star")


def test_metropolis_hastings_is_doubly_stochastic_and_converges_to_the_mean():
    ids = [f"p{i}" for i in range(6)]
    x = {p: {"w": torch.full((3,), float(i))} for i, p in enumerate(ids)}
    for _ in range(200):
        new = {}
        for p in ids:
            nb = neighbours(ids, p, "ring")
            sw, w = metropolis_hastings(degree(ids, p), {j: degree(ids, j) for j in nb})
            assert abs(sw + sum(w.values()) - 1) < 1e-12
            new[p] = mix(x[p], {j: x[j] for j in nb}, sw, w)
        x = new
    for p in ids:
        assert torch.allclose(x[p]["w"], torch.full((3,), 2.5), atol=1e-4)


def test_renormalise_over_answered():
    sw, w = renormalise(0.5, {"a": 0.25, "b": 0.25}, {"a"})
    assert sw == pytest.approx(2 / 3) and w == {"a": pytest.approx(1 / 3)}


def test_mix_keeps_integer_buffers():
    own = {"w": torch.ones(2), "n": torch.tensor(3)}
    other = {"w": torch.zeros(2), "n": torch.tensor(100)}
    out = mix(own, {"o": other}, 0.5, {"o": 0.5})
    assert torch.equal(out["w"], torch.full((2,), 0.5)) and int(out["n"]) == 3


@pytest.mark.parametrize("kind", ["ring", "torus", "exponential", "random", "complete"])
def test_topologies_are_symmetric_deterministic_and_connected(kind):
    from node.algo.comm.topology import graph

    ids = [f"peer{i:02d}" for i in range(12)]
    g = graph(ids, kind, round_=3, seed=1)
    assert g == graph(list(reversed(ids)), kind, round_=3, seed=1)
    assert all(a not in g[a] and all(a in g[b] for b in g[a]) for a in ids)
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for b in g[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    assert seen == set(ids)
    expected = {"ring": 2, "torus": 4, "complete": 11}
    if kind in expected:
        assert all(len(v) == expected[kind] for v in g.values())
    if kind == "random":
        assert all(len(v) <= 4 for v in g.values())
        assert graph(ids, kind, round_=4, seed=1) != g  # re-drawn each round


def test_schedules_spend_exactly_the_budget():
    from node.algo.comm.schedule import allotment

    assert allotment("constant", 10, 40) == [4] * 10
    late = allotment("late", 20, 40, shape=3.0)
    assert sum(late) == 40 and sum(late[:10]) < sum(late[10:]) and sum(late[-5:]) > 0.5 * 40
    assert allotment("late", 10, 30, shape=0.0) == [3] * 10
    with pytest.raises(ValueError):
        allotment("early", 10, 10)


def test_variance_corrected_mean_restores_variance_and_skips_norms():
    from node.algo.aggregate import mean, variance_corrected_mean

    g = torch.Generator().manual_seed(0)
    states = [
        {
            "fc.weight": torch.randn(64, 64, generator=g),
            "bn.weight": torch.randn(64, generator=g),
            "bn.num_batches_tracked": torch.tensor(i),
        }
        for i in range(8)
    ]
    plain, corrected = mean(states), variance_corrected_mean(states)
    # independent inits: the plain mean has ~1/8 of the variance, the corrected one ~all of it
    assert plain["fc.weight"].var() < 0.2
    assert corrected["fc.weight"].var() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(corrected["bn.weight"], plain["bn.weight"])
    assert int(corrected["bn.num_batches_tracked"]) == 0
    # identical inputs: the correction changes nothing
    same = variance_corrected_mean([states[0], states[0]])
    assert torch.allclose(same["fc.weight"], states[0]["fc.weight"], rtol=1e-3, atol=1e-4)  # eps shrinks by ~5e-5


def test_a_sparse_constant_budget_is_spread_evenly():
    from node.algo.comm.schedule import allotment

    steps = allotment("constant", 20, 6)
    assert sum(steps) == 6 and max(steps) == 1
    where = [r for r, s in enumerate(steps) if s]
    assert where[0] < 5 and where[-1] >= 15  # not bunched at either end
    assert allotment("late", 20, 6, 3.0) != steps


def test_modest_sample_is_deterministic_and_sized():
    from node.algo.comm import modest

    ids = [f"p{i}" for i in range(10)]
    t, a = modest.sample(ids, 3, 0, 4, 2)
    assert (t, a) == modest.sample(list(reversed(ids)), 3, 0, 4, 2)
    assert len(t) == 4 and len(a) == 2 and set(t) <= set(ids)
    assert modest.sample(ids, 4, 0, 4, 2) != (t, a)
    assert modest.sample(ids[:1], 0, 0, 4, 2) == (["p0"], ["p0"])
    assert modest.sample(ids, -1, 0, 4, 2) == ([], [])


def test_variance_corrected_mixing_matches_the_merge_for_equal_weights():
    from node.algo.aggregate import variance_corrected_mean

    g = torch.Generator().manual_seed(1)
    a, b = ({"w": torch.randn(50, 20, generator=g), "bn.weight": torch.randn(20, generator=g)} for _ in range(2))
    mixed = mix(a, {"b": b}, 0.5, {"b": 0.5}, correct_variance=True)
    merged = variance_corrected_mean([a, b])
    assert torch.allclose(mixed["w"], merged["w"], atol=1e-5)
    assert torch.allclose(mixed["bn.weight"], (a["bn.weight"] + b["bn.weight"]) / 2)  # norms left alone
    plain = mix(a, {"b": b}, 0.5, {"b": 0.5})
    assert mixed["w"].var() > plain["w"].var() * 1.5  # independent inputs: the plain mean shrinks variance


def test_random_graphs_of_different_rounds_and_steps_never_share_a_stream():
    """The graph clock was r * 1000 + q: round 1 step 0 and round 0 step 1000 drew the same
    random graph. Round and step are now separate components of the seed."""
    from node.algo.comm import seeded_rng
    from node.algo.comm.topology import graph

    assert seeded_rng("g", 0, 1).random() != seeded_rng("g", 0, 0, 1000).random()
    assert seeded_rng("g", 0, 3, 0).random() == seeded_rng("g", 0, 3).random()  # step 0 is the round's stream
    ids = [f"p{i}" for i in range(24)]
    assert graph(ids, "random", 1, 7) != graph(ids, "random", 0, 7, step=1000)
    assert graph(ids, "random", 2, 7, step=1) == graph(ids, "random", 2, 7, step=1)
    assert graph(ids, "ring", 2, 7, step=1) == graph(ids, "ring", 0, 0)  # only random graphs move

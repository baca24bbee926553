"""Units of the byzantine defences: robust aggregators, attack formulas, the trust score,
and the simulator's detection figures."""

import pytest
import torch

from node.algo.aggregate.robust import Context, combine, multi_krum
from node.algo.aggregate.sybilwall import foolsgold_weights
from node.algo.security.attacks import Attack, alie_z, flip_labels
from node.algo.security.trust import TrustTracker

GEN = torch.Generator().manual_seed(0)


def honest_cloud(k=6, d=20, spread=0.05):
    centre = torch.ones(d)
    return centre, {f"h{i}": centre + spread * torch.randn(d, generator=GEN) for i in range(k)}


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_aggregators_ignore_one_huge_outlier(name):
    centre, others = honest_cloud()
    others["bad"] = centre + 1000.0
    w = {j: 1 / 8 for j in others}
    out = combine(name, centre.clone(), others, 1 / 8, w, Context(byzantine_fraction=0.25))
    assert (out.vector - centre).abs().max() < 0.2
    mean = combine("mean", centre.clone(), others, 1 / 8, w, Context())
    assert (mean.vector - centre).abs().max() > 100  # the baseline is dragged away
    if name == "krum":
        assert out.discarded.get("bad") == "not_selected"


def test_multi_krum_drops_the_far_ones():
    _, others = honest_cloud(k=5)
    stack = torch.stack([*others.values(), torch.full((20,), 50.0), torch.full((20,), -50.0)])
    assert multi_krum(stack, f=2) == [0, 1, 2, 3, 4]


def test_clipped_gossip_bounds_the_pull_of_a_far_neighbour():
    own = torch.zeros(4)
    others = {"a": torch.ones(4), "b": torch.ones(4) * 1.2, "far": torch.ones(4) * 1000}
    out = combine("clipped", own, others, 0.25, {j: 0.25 for j in others}, Context())
    assert out.discarded == {"far": "clipped"}
    assert out.vector.norm() < 3 * torch.ones(4).norm()  # clipped to the median distance


def test_foolsgold_zero_weights_identical_histories_and_keeps_distinct_ones():
    g = torch.Generator().manual_seed(1)
    hist = {f"h{i}": torch.randn(30, generator=g) for i in range(4)}
    sybil = torch.randn(30, generator=g)
    hist |= {"s1": sybil, "s2": sybil * 1.0001, "s3": sybil + 1e-5}
    w = foolsgold_weights(hist)
    assert all(w[s] == 0.0 for s in ("s1", "s2", "s3"))
    assert all(w[f"h{i}"] > 0.5 for i in range(4))
    own = torch.zeros(30)
    others = {j: torch.full((30,), 10.0 if j.startswith("s") else 1.0) for j in hist}
    out = combine("sybilwall", own, others, 1 / 8, {j: 1 / 8 for j in hist}, Context(histories=hist))
    assert set(out.discarded) == {"s1", "s2", "s3"} and out.vector.max() < 1.0


def test_bristle_rejects_a_model_bad_on_the_classes_it_knows():
    # toy "model": the vector is its own per-class accuracy; the node knows classes 0 and 1
    ctx = Context(
        per_class_accuracy=lambda v: v.clamp(0, 1), familiar=torch.tensor([True, True, False]), bristle_keep=1.0
    )
    own = torch.tensor([0.8, 0.8, 0.0])
    others = {
        "good": torch.tensor([0.85, 0.8, 0.3]),
        "ok": torch.tensor([0.8, 0.75, 0.9]),
        "flipped": torch.tensor([0.1, 0.0, 0.9]),
    }
    out = combine("bristle", own, others, 0.25, {j: 0.25 for j in others}, ctx)
    assert out.discarded == {"flipped": "rejected"}


def test_attack_formulas():
    base, trained = torch.zeros(5), torch.ones(5)
    assert torch.equal(Attack("sign_flip", scale=4).craft(base, trained, base), -4 * torch.ones(5))
    honest = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])]
    alie = Attack("alie", z=1.0).craft(torch.zeros(2), torch.zeros(2), torch.zeros(2), honest)
    assert torch.allclose(alie, torch.tensor([2 - 2**0.5, 2.0]))  # mean - z * std
    ipm = Attack("ipm", epsilon=2).craft(torch.zeros(2), torch.zeros(2), torch.zeros(2), honest)
    assert torch.allclose(ipm, torch.tensor([-4.0, -4.0]))
    init = torch.arange(3.0)
    assert torch.equal(Attack("free_ride").craft(base[:3], trained[:3], init), init)
    assert torch.equal(flip_labels(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))
    assert 0 < alie_z(22, 6) < 3
    with pytest.raises(ValueError, match="unknown attack"):
        Attack("teleport")


def test_trust_flags_a_sign_flipper_not_honest_neighbours():
    tracker, ref = TrustTracker(), torch.zeros(40)
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(40, generator=g)
    for _ in range(3):
        honest = {f"h{i}": ref + direction + 0.5 * torch.randn(40, generator=g) for i in range(5)}
        tracker.observe(ref, ref + direction, {**honest, "flip": ref - 4 * direction})
    assert tracker.flagged() == {"flip"}
    assert tracker.signals["flip"].cos_consensus < 0 and tracker.signals["flip"].norm_ratio > 3
    assert min(tracker.trust[f"h{i}"] for i in range(5)) > 0.9
    tracker.forget({"h0"})
    assert set(tracker.trust) == {"h0"}


def test_simulated_attack_is_detected_and_defended():
    """6 honest nodes and 2 sign-flipping ones on a complete graph: the trust score flags exactly
    the attackers, the trimmed mean holds, and plain averaging no longer collapses either, since
    flagged peers are clipped to the median update under every aggregator (measured: no attack
    0.878, mean 0.544, trimmed mean 0.569; mean before the clipping: 0.200)."""
    from node.app.bench.algorithms import run_method

    base = {"data": {"alpha": 0.5}, "comm": {"topology": "complete"}, "train": {"rounds": 6, "local_steps": 15}}
    spec = {"attackers": 2, "attack": "sign_flip"}
    plain = run_method({**spec, "node": {"security": {"aggregator": "mean"}}}, 8, base, seed=0)
    robust = run_method({**spec, "node": {"security": {"aggregator": "trimmed_mean"}}}, 8, base, seed=0)
    assert len(robust.final_accuracies) == 6  # honest nodes only
    assert robust.detection["precision"] == 1.0 and robust.detection["recall"] == 1.0
    assert plain.detection["precision"] == 1.0 and plain.detection["recall"] == 1.0
    assert min(robust.final_accuracies) > 0.45 and min(plain.final_accuracies) > 0.4


def test_the_median_matches_numpy_for_odd_and_even_counts():
    """torch.median returns the lower middle value for an even count; the aggregators' median is
    numpy's (the mean of the two middle values)."""
    import numpy as np
    import torch

    from node.algo.aggregate.vectors import median

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4, 7, 8):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        assert np.allclose(median(x).numpy(), np.median(x.numpy(), axis=0)), n
    assert float(median(torch.tensor([1.0, 2.0, 10.0, 11.0]))) == 6.0


def test_the_registry_names_what_the_modules_implement():
    """A name added to node/registry.py without an implementation (or the reverse) fails here."""
    import dataclasses

    import torch

    from node.algo.aggregate.robust import Context, combine
    from node.algo.comm.topology import graph
    from node.algo.security.attacks import Attack
    from node.registry import AGGREGATORS, ATTACK_PARAMS, ATTACKS, TOPOLOGIES

    assert tuple(f.name for f in dataclasses.fields(Attack) if f.name != "name") == ATTACK_PARAMS
    vec = torch.zeros(8)
    for name in ATTACKS:
        assert Attack(name).craft(vec, vec + 1, vec, [vec + 1], n=3, f=1, gen=torch.Generator()).shape == vec.shape
    for name in TOPOLOGIES:
        assert set(graph(["a", "b", "c", "d"], name)) == {"a", "b", "c", "d"}
    ctx = Context(per_class_accuracy=lambda v: torch.ones(10), familiar=torch.ones(10, dtype=torch.bool))
    for name in AGGREGATORS:
        others = {f"p{i}": vec + i for i in range(4)}
        assert combine(name, vec, others, 0.2, {p: 0.2 for p in others}, ctx).vector.shape == vec.shape

"""Federated distillation building blocks: proxy split, EdgeFD filter, KnFu weights, fused
targets, the logits payload and the checks a received one must pass."""

import numpy as np
import pytest
import torch

from node.algo.distill import (
    LogitsRefused,
    check_logits,
    distill_steps,
    distillation_loss,
    edgefd_filter,
    fused_targets,
    knfu_weights,
    logits_payload,
    proxy_split,
    soft_targets,
    speaking_rows,
)
from node.protocol.data import load_dataset
from node.protocol.models import build_model
from node.protocol.train import evaluate
from p2pd.decoding import StreamDecoder
from p2pd.tensors import SnapshotKey, TensorStreamError, encode


def test_proxy_split_is_shared_and_digested():
    a, da = proxy_split(1347, 200, 0, "digits")
    b, db = proxy_split(1347, 200, 0, "digits")
    c, dc = proxy_split(1347, 200, 1, "digits")
    assert np.array_equal(a, b) and da == db and len(set(a.tolist())) == 200
    assert dc != da and not np.array_equal(a, c)
    assert proxy_split(1347, 200, 0, "fashion-mnist")[1] != da
    with pytest.raises(ValueError):
        proxy_split(10, 10, 0, "digits")


def test_edgefd_keeps_in_distribution_proxy_samples():
    ds = load_dataset()
    x, y = ds.x_train, ds.y_train
    local = x[(y == 0) | (y == 1)]  # a node that only has zeros and ones
    proxy_idx, _ = proxy_split(len(x), 400, 0, "digits")
    px, py = x[proxy_idx], y[proxy_idx]
    kept = edgefd_filter(local, px, clusters=4)
    share_in = np.isin(py[kept].numpy(), [0, 1]).mean()
    base_rate = np.isin(py.numpy(), [0, 1]).mean()
    assert len(kept) > 10 and share_in > 3 * base_rate  # mostly zeros and ones, unlike the proxy


def test_knfu_prefers_similar_neighbours():
    g = torch.Generator().manual_seed(0)
    own = torch.randn(100, 10, generator=g)
    own[:, 3] += 5  # we mostly predict class 3
    similar = own + 0.1 * torch.randn(100, 10, generator=g)
    distant = torch.randn(100, 10, generator=g)
    distant[:, 7] += 5
    w = knfu_weights(own, {"similar": similar, "distant": distant}, beta=10)
    assert w["similar"] > 0.9 and abs(sum(w.values()) - 1) < 1e-6
    flat = knfu_weights(own, {"similar": similar, "distant": distant}, beta=0)
    assert flat["similar"] == pytest.approx(0.5)


def test_distillation_transfers_knowledge_to_another_architecture():
    """A CNN teacher trained on all digits teaches an untrained MLP through proxy logits only."""
    ds = load_dataset()
    teacher = build_model("cnn", ds.input_shape, 10, 16, seed=0)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(len(ds.x_train), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(ds.x_train[i]), ds.y_train[i]).backward()
        opt.step()
    proxy_idx, _ = proxy_split(len(ds.x_train), 600, 0, "digits")
    px = ds.x_train[proxy_idx]
    with torch.no_grad():
        targets = soft_targets([teacher(px)], [1.0], temperature=2.0)
    student = build_model("mlp", ds.input_shape, 10, 64, seed=1)
    before = evaluate(student, ds.x_test, ds.y_test)
    sopt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(300):
        i = torch.randint(len(px), (64,), generator=gen)
        sopt.zero_grad()
        distillation_loss(student(px[i]), targets[i]).backward()
        sopt.step()
    after = evaluate(student, ds.x_test, ds.y_test)
    assert before < 0.3 and after > 0.85  # no labels seen by the student


def test_soft_targets_validate_weights():
    logits = [torch.zeros(3, 4), torch.ones(3, 4)]
    t = soft_targets(logits, [1, 3])
    assert torch.allclose(t.sum(1), torch.ones(3))
    with pytest.raises(ValueError):
        soft_targets(logits, [1])
    with pytest.raises(ValueError):
        soft_targets(logits, [-1, 1])


def _wire_round_trip(tensors):
    """Through the real encoder and stream decoder, as a fetched snapshot would arrive."""
    key = SnapshotKey("logits", 3, 0).to_pb()
    dec = StreamDecoder(expected_key=key)
    for raw in encode(tensors, key).parts:
        dec.feed_bytes(raw)
    return dec.finish()


def test_logits_payload_survives_the_wire_and_passes_the_checks():
    ds = load_dataset()
    model = build_model("mlp", ds.input_shape, 10, 16, seed=0)
    px = ds.x_train[:50]
    rows = np.array([1, 4, 9, 30])
    payload = logits_payload(model, px, rows)
    assert payload["logits"].dtype == torch.float16 and payload["mask"].sum() == 4
    got_rows, logits = check_logits(_wire_round_trip(payload), n_proxy=50, num_classes=10)
    assert got_rows.tolist() == rows.tolist() and logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(logits, model(px[rows]), atol=1e-2)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p.update(logits=p["logits"][:, :9]), "logits_shape"),  # 9 classes, not 10
        (lambda p: p.update(logits=p["logits"][:3]), "logits_shape"),  # fewer rows than the mask says
        (lambda p: p.update(mask=torch.ones(49, dtype=torch.uint8)), "logits_shape"),  # another proxy size
        (lambda p: p.update(mask=p["mask"] * 2), "logits_schema"),
        (lambda p: p.update(mask=p["mask"].float()), "logits_schema"),
        (lambda p: p.update(extra=torch.zeros(1)), "logits_schema"),
        (lambda p: p.update(mask=torch.zeros(50, dtype=torch.uint8), logits=torch.zeros(0, 10)), "logits_shape"),
        (lambda p: p["logits"].__setitem__((0, 0), float("inf")), "non_finite"),
    ],
)
def test_malformed_logits_are_refused_with_a_reason(mutate, reason):
    mask = torch.zeros(50, dtype=torch.uint8)
    mask[[2, 5, 7, 11]] = 1
    payload = {"mask": mask, "logits": torch.randn(4, 10)}
    mutate(payload)
    with pytest.raises(LogitsRefused) as e:
        check_logits(payload, n_proxy=50, num_classes=10)
    assert e.value.reason == reason


def test_nan_logits_never_reach_the_check():
    """The transport refuses NaN first (a consistent, correctly digested stream)."""
    payload = {"mask": torch.ones(5, dtype=torch.uint8), "logits": torch.randn(5, 10, dtype=torch.float16)}
    payload["logits"][2, 3] = float("nan")
    with pytest.raises(TensorStreamError) as e:
        _wire_round_trip(payload)
    assert e.value.reason == "non_finite"


def test_fused_targets_average_only_the_teachers_that_spoke_for_a_row():
    a = (torch.tensor([0, 1]), torch.tensor([[10.0, 0.0], [10.0, 0.0]]))  # says class 0 for rows 0, 1
    b = (torch.tensor([1, 2]), torch.tensor([[0.0, 10.0], [0.0, 10.0]]))  # says class 1 for rows 1, 2
    t, covered = fused_targets(4, 2, {"a": a, "b": b}, {"a": 1.0, "b": 3.0}, temperature=1.0)
    assert covered.tolist() == [0, 1, 2]  # row 3: nobody spoke
    assert t[0, 0] > 0.99 and t[2, 1] > 0.99
    assert t[1, 1] == pytest.approx(0.75, abs=1e-3)  # both spoke for row 1, weighted 1:3
    _, none = fused_targets(4, 2, {"a": a}, {"a": 0.0})
    assert len(none) == 0


def test_distill_steps_move_the_student_towards_the_targets_and_skip_when_nothing_is_covered():
    ds = load_dataset()
    student = build_model("mlp", ds.input_shape, 10, 16, seed=1)
    px = ds.x_train[:64]
    targets = torch.nn.functional.one_hot(ds.y_train[:64], 10).float()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    first = distill_steps(student, opt, px, targets, torch.arange(64), 1, 32, 1.0, gen)
    for _ in range(20):
        last = distill_steps(student, opt, px, targets, torch.arange(64), 10, 32, 1.0, gen)
    assert last < first / 2
    assert distill_steps(student, opt, px, targets, torch.tensor([], dtype=torch.long), 5, 32, 1.0, gen) is None


def test_a_filter_that_keeps_nothing_falls_back_to_every_row():
    far = 50.0 + torch.rand((20, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # unlike any digit
    proxy = load_dataset().x_train[:30]
    assert len(speaking_rows(True, far, proxy)) == 30
    assert len(speaking_rows(False, proxy, proxy)) == 30

"""Federated distillation building blocks (issue 6, first part)."""

import numpy as np
import pytest
import torch

from node.data import load_dataset
from node.distill import distillation_loss, edgefd_filter, knfu_weights, proxy_split, soft_targets
from node.models import build_model
from node.train import evaluate


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
    l = [torch.zeros(3, 4), torch.ones(3, 4)]
    t = soft_targets(l, [1, 3])
    assert torch.allclose(t.sum(1), torch.ones(3))
    with pytest.raises(ValueError):
        soft_targets(l, [1])
    with pytest.raises(ValueError):
        soft_targets(l, [-1, 1])

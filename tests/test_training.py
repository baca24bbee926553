"""Local training: it learns, time budgets and stops, step-size schedules, SAM steps."""

import pytest
import torch

from node.protocol.data import load_dataset
from node.protocol.models import build_model
from node.protocol.train import LocalTrainer, evaluate, make_optimizer
from node.task import TensorDataset
from node.task.images import classification_loss


def test_local_training_learns_digits():
    ds = load_dataset()
    model = build_model("mlp", ds.input_shape, 10, 64, seed=0)
    opt = make_optimizer(model, "sgd", 0.05, 0.9, 0.0)
    trainer = LocalTrainer(model, opt, TensorDataset(ds.x_train, ds.y_train), classification_loss, 32, seed=0)
    before = evaluate(model, ds.x_test, ds.y_test)
    stats = trainer.train_round(0, steps=300)
    after = evaluate(model, ds.x_test, ds.y_test)
    assert before < 0.3 and after > 0.9 and stats.steps == 300 and stats.samples_per_second > 0


def test_time_budget_and_stop():
    ds = load_dataset()
    model = build_model("cnn", ds.input_shape, 10, 8)
    opt = make_optimizer(model, "adam", 1e-3, 0.0, 0.0)
    trainer = LocalTrainer(model, opt, TensorDataset(ds.x_train, ds.y_train), classification_loss, 16, seed=0)
    s = trainer.train_round(0, seconds=0.2)
    assert s.steps >= 1 and s.seconds < 2
    assert trainer.train_round(1, steps=100, stop=lambda: True).steps == 1  # finishes the current step only


def test_round_lr_schedules():
    from node.protocol.train import round_lr

    assert round_lr(0.1, "constant", 7, 10) == 0.1
    assert round_lr(0.1, "cosine", 0, 10) == pytest.approx(0.1)
    assert round_lr(0.1, "cosine", 9, 10, 0.05) == pytest.approx(0.005)
    lrs = [round_lr(0.1, "cosine", r, 10) for r in range(10)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_sam_steps_learn_and_differ_from_sgd():
    ds = load_dataset()
    out = {}
    for rho in (0.0, 0.05):
        model = build_model("mlp", ds.input_shape, 10, 64, seed=0)
        trainer = LocalTrainer(
            model,
            make_optimizer(model, "sgd", 0.05, 0.9, 0.0),
            TensorDataset(ds.x_train, ds.y_train),
            classification_loss,
            32,
            seed=0,
            sam_rho=rho,
        )
        trainer.train_round(0, steps=300)
        out[rho] = (evaluate(model, ds.x_test, ds.y_test), model.state_dict()["1.weight"].clone())
    assert out[0.05][0] > 0.9
    assert not torch.equal(out[0.0][1], out[0.05][1])

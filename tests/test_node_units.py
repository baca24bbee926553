"""Units of node/: config, partitions, topology, mixing, checkpoints, local training."""

import numpy as np
import pytest
import torch
from sysdeps import needs

from node.algo.comm.mixing import metropolis_hastings, mix, renormalise
from node.algo.comm.topology import degree, neighbours
from node.config import ConfigError, load_config, parse_override
from node.net import checkpoint
from node.protocol.data import load_dataset, partition
from node.protocol.models import build_model
from node.protocol.train import LocalTrainer, evaluate, make_optimizer, optimizer_tensors, restore_optimizer
from node.task import TensorDataset
from node.task.images import classification_loss


# -- config -----------------------------------------------------------------------------------
def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  rounds: 7\ndata:\n  alpha: 0.1\n")
    cfg = load_config(
        p, dict([parse_override("train.rounds=9"), parse_override("net.initial_peers=[/ip4/1.2.3.4/tcp/1]")])
    )
    assert cfg.train.rounds == 9 and cfg.data.alpha == 0.1 and cfg.net.initial_peers == ["/ip4/1.2.3.4/tcp/1"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"train.rounds": 0}, "train.rounds"),
        ({"optim.lr": "fast"}, "optim.lr"),
        ({"data.partition": "random"}, "data.partition"),
        ({"trian.rounds": 3}, "trian"),
        ({"node_index": 4, "node_count": 4}, "node_index"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_field_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


# -- data -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_cover_everything_once_and_are_deterministic(kind):
    y = load_dataset().y_train.numpy()
    parts = partition(y, 8, kind, alpha=0.3, seed=4)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 10
    again = partition(y, 8, kind, alpha=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skew_follows_alpha():
    y = load_dataset().y_train.numpy()

    def mean_classes_per_node(alpha):  # classes holding >= 5% of a node's data
        return np.mean(
            [
                (np.bincount(y[p], minlength=10) / len(p) >= 0.05).sum()
                for p in partition(y, 8, "dirichlet", alpha=alpha)
            ]
        )

    assert mean_classes_per_node(0.1) < mean_classes_per_node(100.0)


def test_partition_refuses_impossible_requests():
    with pytest.raises(ValueError):
        partition(np.zeros(50, dtype=int), 10)


def test_split_is_stratified_and_shared():
    a, b = load_dataset(seed=3), load_dataset(seed=3)
    assert torch.equal(a.y_test, b.y_test) and set(a.y_test.tolist()) == set(range(10))


def test_digits_read_without_sklearn_equal_sklearn_loader():
    # a node reads the file scikit-learn ships instead of importing scikit-learn (0.5 s, 30 MB)
    import subprocess
    import sys

    code = "import sys; from node.protocol.data import load_dataset; load_dataset(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    from sklearn.datasets import load_digits

    from node.protocol.data.datasets import read_digits

    x, y = read_digits()
    d = load_digits()
    assert np.array_equal(x, d.images.astype(np.float32)) and np.array_equal(y, d.target)


def test_digits_path_names_the_table(tmp_path):
    import gzip

    from node.protocol.data import DatasetMissing

    with pytest.raises(DatasetMissing, match="missing"):
        load_dataset("digits", path=tmp_path / "nope.csv.gz")
    junk = tmp_path / "junk.csv.gz"
    junk.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(ValueError, match="not scikit-learn's digits table"):
        load_dataset("digits", path=junk)


# -- topology and mixing ----------------------------------------------------------------------
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


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_corruption(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, 16)
    opt = make_optimizer(model, "sgd", 0.1, 0.9, 0.0)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    t, meta = optimizer_tensors(opt)
    checkpoint.save(tmp_path, model.state_dict(), t, {"round": 5, "optim": meta}, keep=1)
    checkpoint.save(tmp_path, model.state_dict(), t, {"round": 6, "optim": meta}, keep=1)
    names = ["model-2.safetensors", "optim-2.safetensors", "state-2.json", "state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    m2, o2, state = checkpoint.load(tmp_path, torch.device("cpu"))
    assert state["round"] == 6 and all(torch.equal(m2[k], v) for k, v in model.state_dict().items())
    opt2 = make_optimizer(build_model("mlp", (1, 8, 8), 10, 16), "sgd", 0.1, 0.9, 0.0)
    restore_optimizer(opt2, o2, state["optim"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    # corrupted file, non-object state: a clear CheckpointError, never a traceback from deep inside
    (tmp_path / "model-2.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path, torch.device("cpu"))
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(checkpoint.CheckpointError, match="not a JSON object"):
        checkpoint.load(tmp_path, torch.device("cpu"))
    assert checkpoint.load(tmp_path / "none", torch.device("cpu")) is None


def test_checkpoint_survives_a_crash_between_files(tmp_path, monkeypatch):
    """A save that dies after writing the new model file leaves the previous checkpoint usable."""
    model = build_model("mlp", (1, 8, 8), 10, 16)
    checkpoint.save(tmp_path, model.state_dict(), {}, {"round": 3})
    real = checkpoint._fsync_write
    calls = []

    def crash_on_second(path, write):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("power cut")
        real(path, write)

    monkeypatch.setattr(checkpoint, "_fsync_write", crash_on_second)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    with pytest.raises(checkpoint.CheckpointError, match="power cut; the previous checkpoint is kept"):
        checkpoint.save(tmp_path, model.state_dict(), {}, {"round": 4})
    monkeypatch.setattr(checkpoint, "_fsync_write", real)
    _, _, state = checkpoint.load(tmp_path, torch.device("cpu"))
    assert state["round"] == 3


# -- training ---------------------------------------------------------------------------------
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


def _write_idx(path, arr):
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def test_fashion_mnist_reader_on_small_idx_files(tmp_path):
    from node.protocol.data.datasets import DatasetMissing

    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", path=tmp_path)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    ds = load_dataset("fashion-mnist", path=tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (12, 1, 28, 28)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    # a truncated file and a wrong magic number are refused with a reason
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 11, dtype=np.uint8))
    with pytest.raises(ValueError, match="inconsistent"):
        load_dataset("fashion-mnist", path=tmp_path)
    import gzip

    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        load_dataset("fashion-mnist", path=tmp_path)


@needs("dataset-fashion-mnist")
def test_real_fashion_mnist_when_installed():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10


@needs("prometheus")
def test_metrics_pass_promtool():
    import subprocess

    from prometheus_client import generate_latest

    from node.net.metrics import NodeMetrics

    m = NodeMetrics()
    m.watch(lambda: 123, lambda: {"bad_signature": 2, "expired": 1})
    m.fetch_failures.labels(reason="timeout").inc()
    m.fetch_seconds.labels(path="relay").observe(0.2)
    text = generate_latest(m.registry)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b'atoll_records_refused_total{reason="bad_signature"} 2.0' in text


def test_swarm_config_per_node_overrides(tmp_path):
    from node.config import load_swarm_config

    p = tmp_path / "s.yaml"
    p.write_text("nodes: 3\nnode:\n  train: {rounds: 5}\nper_node:\n  2: {model.width: 32, optim.lr: 0.01}\n")
    s = load_swarm_config(p, {"data.alpha": 0.2})
    c0, c2 = s.config_for(0), s.config_for(2)
    assert (c0.node_index, c0.node_count, c0.model.width, c0.train.rounds, c0.data.alpha) == (0, 3, 128, 5, 0.2)
    assert (c2.node_index, c2.model.width, c2.optim.lr) == (2, 32, 0.01)
    assert load_swarm_config(p, nodes=5).nodes == 5
    p.write_text("nodes: 2\nper_node:\n  1: {model.family: transformer}\n")
    with pytest.raises(ConfigError, match=r"per_node\[1\].*model.family"):
        load_swarm_config(p)


def test_example_swarm_config_is_valid():
    from helpers import ROOT

    from node.config import load_swarm_config

    s = load_swarm_config(ROOT / "examples" / "swarm4.yaml")
    assert s.nodes == 4 and s.node.data.dataset == "digits" and s.node.data.alpha == 0.5


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


def test_the_config_accepts_exactly_the_registered_topologies():
    """One list of topology names (node.algo.comm.topology.KINDS); the config's choices are that list."""
    import typing

    from node.algo.comm.topology import KINDS
    from node.config import CommConfig

    assert typing.get_args(CommConfig.model_fields["topology"].annotation) == KINDS


def test_swarm_up_shares_the_cores_among_its_nodes(tmp_path, monkeypatch):
    """Each of N local nodes gets cores // N torch threads (at least 1) unless threads is set."""
    import torch

    from node.app import swarm
    from node.config import load_swarm_config
    from node.net import threads

    monkeypatch.setattr(swarm, "usable_cores", lambda: 8)
    cfgs = swarm.node_configs(load_swarm_config(None, {}, 3), tmp_path)
    assert [c.threads for c in cfgs] == [2, 2, 2]
    pinned = swarm.node_configs(load_swarm_config(None, {"threads": 5}, 3), tmp_path)
    assert [c.threads for c in pinned] == [5, 5, 5]
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_background_checkpoints_keep_the_newest_and_report_errors(tmp_path):
    """The writer saves copies on its own thread: what is on disk after a flush is the last
    round submitted, unaffected by training after the submit; a failed write is raised."""
    from node.config import NodeConfig
    from node.protocol.worker import Worker

    worker = Worker(NodeConfig(model={"width": 8}))
    writer = checkpoint.Writer(tmp_path / "ck")
    for r in range(1, 6):
        writer.submit(checkpoint.capture(worker, "peer", r, accuracy=None))
    before = {k: v.clone() for k, v in worker.state().items()}
    writer.submit(checkpoint.capture(worker, "peer", 6, accuracy=0.5))
    worker.train(0)  # moves the model while the copy may still be written
    writer.flush()
    model, _, state = checkpoint.load(tmp_path / "ck", torch.device("cpu"))
    assert state["round"] == 6 and state["accuracy"] == 0.5
    assert all(torch.equal(model[k], before[k]) for k in before)
    (tmp_path / "file").write_text("")
    broken = checkpoint.Writer(tmp_path / "file" / "ck")  # a directory under a file
    broken.submit(checkpoint.capture(worker, "peer", 1, accuracy=None))
    with pytest.raises(checkpoint.CheckpointError, match="cannot write a checkpoint to"):
        broken.flush()
    writer.close()


def test_status_table_shows_reach_where_it_says_something():
    from rich.console import Console

    from node.app.console import status_table
    from p2pd.identity import Identity
    from p2pd.records import PeerRecord

    def rec(**kw):
        i = Identity.generate()
        return PeerRecord(peer_id=i.peer_id, grpc_address="127.0.0.1:5000", issued_at=1, expires_at=10, **kw)

    def text(records, width):
        c = Console(width=width, record=True)
        c.print(status_table(records, width))
        return c.export_text()

    direct, hidden = rec(), rec(reachability="outbound_only", carrier=Identity.generate().peer_id)
    assert "reach" not in text([direct], 80) and "reach" in text([direct], 160)
    out = text([direct, hidden], 160)
    assert "reach" in out and "pushed via" in out and "direct" in out

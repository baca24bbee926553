"""Bring your own task (node/task): a workload atoll has never seen runs in daemons and in the
simulator, and a broken task is one clear line before the node joins."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from helpers import ROOT
from sysdeps import needs

from node.config import NodeConfig, SwarmConfig
from node.protocol.sim import Simulation
from node.protocol.worker import Worker
from node.task import TaskError

REGRESSION = textwrap.dedent(
    '''
    """Linear regression on synthetic data: each node holds too few samples to fit the 20
    weights alone (16 each), the three together hold enough."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from node.task import Task


    def task(config):
        dim, per_node, noise = int(config["dim"]), int(config["per_node"]), 0.1
        truth = torch.randn(dim, 1, generator=torch.Generator().manual_seed(0))

        def sample(n, seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, dim, generator=g)
            return x, x @ truth + noise * torch.randn(n, 1, generator=g)

        x_test, y_test = sample(500, 12345)

        def model(seed):
            torch.manual_seed(seed)
            return torch.nn.Linear(dim, 1)

        return Task(
            name="linear-regression",
            model=model,
            train_data=lambda index, count, seed: TensorDataset(*sample(per_node, 1000 * seed + index + 1)),
            loss=lambda m, batch: F.mse_loss(m(batch[0]), batch[1]),
            evaluate=lambda m: {"mse": float(F.mse_loss(m(x_test), y_test))},
            metric="mse",
            higher_is_better=False,
        )
    '''
)

NODE = {
    "task_config": {"dim": 20, "per_node": 16},
    "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "batch_size": 8, "schedule": "constant"},
    "train": {"rounds": 30, "local_steps": 5},
    "comm": {"topology": "ring"},
    "threads": 1,
}


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "regression.py"
    path.write_text(REGRESSION)
    return path


def node_config(task_file, **over) -> dict:
    return {**NODE, "task": f"{task_file}:task", **over}


def isolated_mse(tree: dict, nodes: int) -> list[float]:
    """Each node trains alone on its partition for the same steps."""
    out = []
    for i in range(nodes):
        w = Worker(NodeConfig.model_validate({**tree, "node_count": nodes, "node_index": i}))
        for r in range(w.cfg.train.rounds):
            w.train(r)
        out.append(w.evaluate())
    return out


def test_a_task_atoll_never_saw_runs_in_the_simulator_and_beats_isolated_nodes(task_file):
    tree = node_config(task_file)
    res = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree))).run()
    alone = isolated_mse(tree, 3)
    assert max(res.final_accuracies) < min(alone), (res.final_accuracies, alone)  # MSE: lower is better
    w = Worker(NodeConfig.model_validate(tree))
    assert w.metric == "mse" and set(w.metrics) == {"mse"} and w.x is None


BROKEN = {
    "missing file": ("{dir}/nope.py:task", "", "not found"),
    "missing module": ("no_such_pkg.tasks:task", "", "no module named 'no_such_pkg'"),
    "missing attribute": ("{file}:nothing", "", "has no attribute 'nothing'"),
    "not a task": ("{file}:VALUE", "VALUE = 3\n", "is a int, expected a Task"),
    "import error": ("{file}:task", "import no_such_module_x\n", "importing regression.py raised ModuleNotFoundError"),
    "hook raises": (
        "{file}:bad",
        "def bad(config):\n    t = task(config)\n    import dataclasses\n"
        "    return dataclasses.replace(t, model=lambda seed: 1 / 0)\n",
        "hook `model` raised ZeroDivisionError",
    ),
    "loss not scalar": (
        "{file}:bad",
        "def bad(config):\n    t = task(config)\n    import dataclasses\n"
        "    return dataclasses.replace(t, loss=lambda m, b: (m(b[0]) - b[1]) ** 2)\n",
        "hook `loss` returned a tensor of shape (2, 1), expected a scalar floating tensor",
    ),
    "evaluate without the metric": (
        "{file}:bad",
        "def bad(config):\n    t = task(config)\n    import dataclasses\n"
        "    return dataclasses.replace(t, evaluate=lambda m: {'loss': 1.0})\n",
        "without the task's metric 'mse'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_task_is_one_clear_error(case, task_file):
    ref, extra, message = BROKEN[case]
    task_file.write_text(REGRESSION + extra)
    tree = node_config(task_file)
    tree["task"] = ref.format(dir=task_file.parent, file=task_file)
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        Worker(NodeConfig.model_validate(tree))
    assert "\n" not in str(e.value) and tree["task"] in str(e.value)


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
@pytest.mark.integration
def test_atoll_new_task_then_a_task_atoll_never_saw_in_a_three_daemon_swarm(tmp_path):
    """What a new user does: `atoll new task demo`, edit demo.py (here: replaced by a task atoll
    has never seen), `atoll swarm up -c demo.yaml` from that folder. Every node's MSE ends below
    every isolated node's, and the centralized baseline trains on all the nodes' data."""
    atoll = [sys.executable, "-m", "node.app.cli"]
    r = subprocess.run(atoll + ["new", "task", "demo"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and (tmp_path / "demo.py").is_file() and (tmp_path / "demo.yaml").is_file(), r.stderr
    again = subprocess.run(atoll + ["new", "task", "demo"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr  # never overwrites
    (tmp_path / "demo.py").write_text(REGRESSION)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        atoll + ["swarm", "up", "-c", "demo.yaml", "--set", "train.rounds=20", "--out", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    finals = [n["final_score"] for n in res["nodes"]]
    assert all(n["metric"] == "mse" and n["rounds"] == 20 for n in res["nodes"])
    swarm = yaml.safe_load((tmp_path / "demo.yaml").read_text())
    tree = {**swarm["node"], "task": f"{tmp_path / 'demo.py'}:task", "train": {"rounds": 20, "local_steps": 5}}
    del tree["net"]
    alone = isolated_mse(tree, 3)
    assert max(finals) < min(alone), (finals, alone)
    (central,) = res["centralized_baseline"].values()
    assert central < min(alone)  # trained on every node's data
    assert "node mse: min" in r.stdout and "centralized baseline: mse" in r.stdout


def test_the_shipped_template_learns_in_the_simulator():
    """examples/regression.yaml runs the template `atoll new task` copies."""
    from node.config import load_swarm_config

    swarm = load_swarm_config(ROOT / "examples" / "regression.yaml", {"train.rounds": 15})
    res = Simulation(swarm).run()
    first = Worker(swarm.config_for(0))
    assert max(res.final_accuracies) < first.evaluate() / 10  # from the shared init to a fit


@pytest.mark.integration
def test_a_broken_task_stops_the_node_before_it_joins(task_file, tmp_path):
    task_file.write_text(REGRESSION + "def bad(config):\n    raise RuntimeError('no data here')\n")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({**node_config(task_file), "task": f"{task_file}:bad", "metrics_port": None}))
    r = subprocess.run(
        [sys.executable, "-m", "node.app.cli", "node", "start", "-c", str(cfg), "--json-events"]
        + ["--identity", str(tmp_path / "k"), "--checkpoint-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "building it from task_config raised RuntimeError: no data here" in r.stderr
    assert r.stdout.strip() == ""  # no event: it never joined


def test_config_refuses_what_needs_the_builtin_labels(task_file):
    from node.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="work on the built-in image tasks only"):
        load_config(None, {"task": f"{task_file}:task", "comm.exchange": "logits"})
    with pytest.raises(ConfigError, match="task_config is for a task of your own"):
        load_config(None, {"task_config": {"a": 1}})
    assert torch.get_num_threads() >= 1


# -- the built-in language-model task (node/task/text.py) -----------------------------------------
LM = {
    "task": "node.task.text:kjv",
    "task_config": {"context": 32, "width": 32, "layers": 1, "heads": 2},
    "optim": {"name": "adam", "lr": 0.003, "batch_size": 16},
    "train": {"rounds": 10, "local_steps": 5},
    "node_count": 4,
    "node_index": 2,
    "threads": 1,
}


@needs("bible-kjv", "bible-kjv-text")
def test_the_language_model_task_learns_the_kjv_text():
    from node.task.text import kjv_text

    text = kjv_text()
    assert len(text) > 4_000_000 and text.startswith(b"In the beginning God created the heaven and the earth.")
    w = Worker(NodeConfig.model_validate(LM))
    before = w.evaluate()
    assert 150 < before < 400 and w.metric == "perplexity" and set(w.metrics) == {"perplexity", "bits_per_byte"}
    for r in range(10):
        w.train(r)
    assert w.evaluate() < before / 8  # 50 steps already learn the byte statistics
    books = Worker(NodeConfig.model_validate({**LM, "node_index": 0})).data.tensors[0]
    assert not torch.equal(books[:5], w.data.tensors[0][:5])  # different books per node


def test_the_language_model_task_refuses_a_bad_task_config_in_one_line():
    with pytest.raises(TaskError, match=r"unknown task_config keys \['depth'\]"):
        Worker(NodeConfig.model_validate({**LM, "task_config": {"depth": 3}}))


def test_a_missing_bible_says_which_packages(monkeypatch):
    from node.protocol.data import DatasetMissing
    from node.task import text

    text.kjv_text.cache_clear()
    monkeypatch.setattr(text.shutil, "which", lambda name: None)
    with pytest.raises(DatasetMissing, match="apt-get install bible-kjv bible-kjv-text"):
        text.kjv_text()
    text.kjv_text.cache_clear()


@pytest.mark.slow
@needs("bible-kjv", "bible-kjv-text")
def test_four_daemons_on_the_kjv_text_end_near_a_centralized_model(tmp_path):
    """The issue's bar: held-out perplexity within 10% of a centralized model trained with the
    same steps on all the books, in the same run (examples/kjv4.yaml: each node reads other books)."""
    r = subprocess.run(
        [sys.executable, "-m", "node.app.cli", "swarm", "up", "-c", "examples/kjv4.yaml", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    (central,) = res["centralized_baseline"].values()
    finals = [n["final_score"] for n in res["nodes"]]
    assert all(n["metric"] == "perplexity" for n in res["nodes"]) and len(finals) == 4
    assert max(finals) <= 1.10 * central, (finals, central)


@needs("fortunes", "bible-kjv", "bible-kjv-text")
def test_lora_fine_tuning_exchanges_only_the_adapters():
    """peft LoRA on the KJV byte model, fine-tuned on the fortunes: only `lora_` tensors travel
    (bytes counted as on the wire), the pretrained base stays the same on every node."""
    tree = {
        "task": "node.task.text:fortunes_lora",
        "task_config": {"context": 16, "width": 32, "layers": 1, "heads": 2, "rank": 2, "pretrain_steps": 5},
        "optim": {"name": "adam", "lr": 0.003, "batch_size": 8},
        "train": {"rounds": 3, "local_steps": 2},
        "threads": 1,
    }
    sim = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree)))
    w = sim.workers[0]
    base = {k: v.clone() for k, v in w.full_state().items() if "lora_" not in k}
    adapters, full = w.state(), w.full_state()
    assert adapters and all("lora_" in k for k in adapters) and len(adapters) < len(full)
    nbytes = lambda sd: sum(v.numel() * v.element_size() for v in sd.values())  # noqa: E731
    assert nbytes(adapters) < nbytes(full) / 10
    res = sim.run()
    fetches = 3 * 3 * 2  # nodes x rounds x ring neighbours
    assert 0 < res.bytes_sent < 1.5 * fetches * nbytes(adapters)  # adapters and stream framing, no more
    assert res.bytes_sent < fetches * nbytes(full) / 10
    for worker in sim.workers:
        after = worker.full_state()
        assert all(torch.equal(after[k], v) for k, v in base.items())  # the base never moved


@pytest.mark.integration
def test_atoll_inside_your_own_training_loop(tmp_path):
    """examples/own_loop.py: two processes train their own model with their own optimizer and
    call Peer.step() after each round; each ends below the same loop without atoll."""
    from helpers import kill_tree

    script = [sys.executable, str(ROOT / "examples" / "own_loop.py"), "--nodes", "2", "--rounds", "12"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(*args):
        return subprocess.Popen(
            script + list(args),
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{args[1]}.log", "w"),
            text=True,
            env=env,
            start_new_session=True,
        )

    first = start("--index", "0", "--key", str(tmp_path / "a.key"))
    procs = [first]
    try:
        joined = json.loads(first.stdout.readline())
        assert joined["event"] == "joined" and joined["maddrs"], (tmp_path / "0.log").read_text()[-2000:]
        procs.append(start("--index", "1", "--key", str(tmp_path / "b.key"), "-p", joined["maddrs"][0]))
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out
            done = json.loads(out.strip().splitlines()[-1])
            assert done["event"] == "done" and done["mse"] < done["mse_alone"] / 2, done
    finally:
        for p in procs:
            kill_tree(p.pid)


def test_review_fixes_for_own_tasks(task_file):
    """A task's own optimizer keeps its learning rate (scaled by the schedule); items that cannot
    be batched are one TaskError line; nodes that differ in task_config still exchange (the
    digest covers the name and the tensors that travel); a hosted model stays in train mode."""
    from node.net.peer import HostedWorker, hosted_task
    from node.protocol.train import round_lr
    from node.task import Checked

    extra = (
        "def own_opt(config):\n    import dataclasses\n    t = task(config)\n"
        "    return dataclasses.replace(t, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))\n"
        "def bad_items(config):\n    import dataclasses\n    t = task(config)\n"
        "    return dataclasses.replace(t, train_data=lambda i, n, s: [object()] * 4)\n"
    )
    task_file.write_text(REGRESSION + extra)
    tree = {**node_config(task_file), "optim": {**NODE["optim"], "schedule": "cosine"}}
    w = Worker(NodeConfig.model_validate({**tree, "task": f"{task_file}:own_opt"}))
    w.train(3)
    factor = round_lr(1.0, "cosine", 3, NODE["train"]["rounds"], 0.05)
    assert w.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    with pytest.raises(TaskError, match="cannot be batched"):
        Worker(NodeConfig.model_validate({**tree, "task": f"{task_file}:bad_items"}))
    small = Worker(NodeConfig.model_validate({**tree, "task_config": {"dim": 20, "per_node": 8}}))
    assert small.task_digest == Worker(NodeConfig.model_validate(tree)).task_digest

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1))
    model.train()
    HostedWorker(NodeConfig(), task=Checked(hosted_task(model, 4, None), "yours"))
    assert model.training


def test_newcomer_reports(tmp_path):
    """A newcomer's try of the README: a file task path is relative to the YAML naming it, a
    diverged loss says so in words, the template refuses a misspelt task_config key, and a node
    that fails before it is ready is named with its error line."""
    from node.app.swarm import _last_error
    from node.config import load_swarm_config
    from node.protocol.worker import NonFinite

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yaml").write_text("nodes: 2\nnode:\n  task: ./t.py:task\n")
    assert load_swarm_config(tmp_path / "sub" / "s.yaml").node.task == f"{tmp_path / 'sub' / 't.py'}:task"
    assert "became non-finite (NaN/Inf): lower optim.lr" in str(NonFinite("loss"))
    with pytest.raises(TaskError, match=r"unknown task_config keys \['per_nod'\]"):
        Worker(NodeConfig.model_validate({"task": "node.task.template:task", "task_config": {"per_nod": 16}}))
    log = tmp_path / "n.log"
    log.write_text("INFO starting\nerror: task ./t.py:task: hook `loss` returned a tensor of shape (2, 1)\n")
    assert _last_error(log) == ": task ./t.py:task: hook `loss` returned a tensor of shape (2, 1)"
    assert _last_error(tmp_path / "missing.log") == ""


STREAMS = textwrap.dedent(
    '''
    import dataclasses
    import os
    import torch
    from torch.utils.data import Dataset, IterableDataset


    class Stream(IterableDataset):
        """An endless stream of one node's samples, never held in memory as a whole."""

        def __init__(self, sample, seed):
            self.sample, self.seed = sample, seed

        def __iter__(self):
            for k in range(200):  # a finite pass: the trainer starts it over
                x, y = self.sample(1, self.seed * 100_000 + k)
                yield x[0], y[0]


    class Items(Dataset):
        """A map-style dataset read item by item (as from files), recording who reads it."""

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i], torch.tensor(os.getpid())


    def stream(config):
        base = task(config)
        def data(index, count, seed):
            x, y = base.train_data(index, count, seed).tensors
            return Stream(lambda n, s: (x[s % len(x)].unsqueeze(0), y[s % len(y)].unsqueeze(0)), index)
        return dataclasses.replace(base, train_data=data)


    def items(config):
        base = task(config)
        def data(index, count, seed):
            return Items(*base.train_data(index, count, seed).tensors)
        seen = []
        def loss(m, batch):
            seen.extend(batch[2].tolist())
            seen[:] = seen[-64:]
            return torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        def evaluate(m):
            readers = {"readers": float(len(set(seen))), "read_here": float(os.getpid() in seen)}
            return {**base.evaluate(m), **readers}
        return dataclasses.replace(base, train_data=data, loss=loss, evaluate=evaluate)


    def autocast(config):
        base = task(config)
        dtypes = []
        def loss(m, batch):
            out = m(batch[0])
            dtypes.append(out.dtype)
            return torch.nn.functional.mse_loss(out.float(), batch[1])
        def evaluate(m):
            return {**base.evaluate(m), "bf16": float(dtypes[-1] == torch.bfloat16)}
        return dataclasses.replace(base, loss=loss, evaluate=evaluate)
    '''
)


def test_streams_loader_workers_and_mixed_precision(task_file):
    """An IterableDataset trains (data larger than memory), a map-style dataset is read by
    DataLoader worker processes when train.loader_workers is set (and they stop with the node),
    and train.precision: bf16 runs the loss under autocast while every tensor that travels stays
    float32."""
    task_file.write_text(REGRESSION + STREAMS)
    tree = node_config(task_file)
    first = Worker(NodeConfig.model_validate(tree)).evaluate()

    w = Worker(NodeConfig.model_validate({**tree, "task": f"{task_file}:stream"}))
    assert w.dataset_size == 1  # a stream without a length: every node weighs the same
    for r in range(10):
        w.train(r)
    assert w.evaluate() < 0.5 * first

    train = {**NODE["train"], "loader_workers": 2}
    w = Worker(NodeConfig.model_validate({**tree, "task": f"{task_file}:items", "train": train}))
    for r in range(4):
        w.train(r)
    w.evaluate()
    assert w.metrics["mse"] < first
    workers = w.trainer._batches._workers
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    assert w.metrics["readers"] == 2 and w.metrics["read_here"] == 0  # read in the two workers only
    w.trainer.close()
    for p in workers:
        p.join(10)
    assert not any(p.is_alive() for p in workers)

    train = {**NODE["train"], "precision": "bf16"}
    w = Worker(NodeConfig.model_validate({**tree, "task": f"{task_file}:autocast", "train": train}))
    for r in range(10):
        w.train(r)
    assert w.evaluate() < 0.5 * first and w.metrics["bf16"] == 1.0
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in w.state().values())
    from node.protocol.worker import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None  # CPUs train in float32 unless asked


def test_the_experts_denoiser_is_a_task_a_swarm_trains_together():
    """The diffusion experts' flow-matching denoiser on the task contract: three simulated nodes
    gossiping end with a held-out flow loss well below where they started; `split: clusters`
    gives nodes disjoint clusters."""
    tree = {
        "task": "node.task.flow:denoiser",
        "task_config": {"width": 64, "depth": 2},
        "optim": {"name": "adam", "lr": 2e-3, "batch_size": 32, "schedule": "constant"},
        "train": {"rounds": 15, "local_steps": 10},
        "threads": 1,
    }
    start = Worker(NodeConfig.model_validate(tree)).evaluate()
    res = Simulation(SwarmConfig(nodes=3, node=NodeConfig.model_validate(tree))).run()
    assert max(res.final_accuracies) < 0.8 * start, (res.final_accuracies, start)
    clustered = {**tree, "task_config": {"width": 64, "depth": 2, "split": "clusters"}, "node_count": 3}
    parts = [Worker(NodeConfig.model_validate({**clustered, "node_index": i})).data.tensors[0] for i in range(3)]
    assert sum(len(p) for p in parts) > 1000
    rows = [{tuple(r.tolist()) for r in p} for p in parts]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])

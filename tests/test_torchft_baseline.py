"""torchft's DiLoCo baseline (node/app/bench/torchft_app.py) in its own virtual environment:
a Lighthouse and 2 replicas on 127.0.0.1 train the digits MLP and end on one model.

Slow: the first run creates the environment (pip, about half a minute) in
$ATOLL_TORCHFT_VENV or ~/.cache/atoll/torchft-venv."""

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from node.app.bench.swarm import free_port
from node.app.bench.torchft_env import lighthouse_command, torchft_python
from node.config import NodeConfig, SwarmConfig
from node.protocol.data.datasets import digits_file
from node.protocol.worker import Worker
from p2pd.procs import kill_tree

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NODES, ROUNDS, STEPS = 2, 5, 10
RUN_SECONDS = 240  # the replicas' whole run, start-up included


def _venv() -> Path:
    return Path(os.environ.get("ATOLL_TORCHFT_VENV", Path.home() / ".cache" / "atoll" / "torchft-venv"))


def _events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _spawn(cmd: list[str], log: Path, err: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out, open(err, "wb") as errf:
        return subprocess.Popen(
            cmd, stdout=out, stderr=errf, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


@pytest.mark.timeout(900)
def test_diloco_two_replicas_agree(tmp_path):
    python = torchft_python(_venv(), progress=lambda m: None)
    node = NodeConfig.model_validate(
        {
            "model": {"family": "mlp", "width": 32},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 32},
            "train": {"rounds": ROUNDS, "local_steps": STEPS},
            "data": {"dataset": "digits", "partition": "iid", "path": str(digits_file())},
        }
    )
    swarm = SwarmConfig(nodes=NODES, node=node)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        lighthouse = _spawn(
            lighthouse_command(python, f"127.0.0.1:{port}", NODES),
            tmp_path / "lighthouse.log",
            tmp_path / "lighthouse.err",
            env,
        )
        procs.append(lighthouse)
        replicas = []
        for i in range(NODES):
            path = tmp_path / f"node{i}.json"
            path.write_text(json.dumps(swarm.config_for(i).model_dump(mode="json")))
            cmd = [str(python), "-m", "node.app.bench.torchft_app", "replica"]
            cmd += ["--lighthouse", f"http://127.0.0.1:{port}", "--config", str(path)]
            cmd += ["--replica-id", str(i), "--nodes", str(NODES), "--host", "127.0.0.1", "--threads", "1"]
            cmd += ["--timeout", "60", "--quorum-timeout", "120"]
            replicas.append(_spawn(cmd, tmp_path / f"node{i}.log", tmp_path / f"node{i}.err", env))
        procs += replicas
        deadline = time.monotonic() + RUN_SECONDS
        while any(p.poll() is None for p in replicas) and time.monotonic() < deadline:
            if lighthouse.poll() is not None:
                break
            if any(p.poll() not in (None, 0) for p in replicas):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in replicas]
        tails = {i: (tmp_path / f"node{i}.err").read_text()[-3000:] for i in range(NODES)}
        assert codes == [0] * NODES, f"replica exit codes {codes} (None: still running); stderr tails: {tails}"

        finals = []
        for i in range(NODES):
            events = _events(tmp_path / f"node{i}.log")
            rounds = [e for e in events if e["event"] == "round"]
            assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1)), events  # rounds done, as atoll's
            for e in rounds:
                assert math.isfinite(e["accuracy"]) and math.isfinite(e["loss"]) and e["score"] == e["accuracy"], e
                assert e["compute_s"] > 0 and e["comm_s"] >= 0 and 0 < e["utilization"] <= 1, e
            sent = [e["sent_bytes"] for e in rounds]
            assert sent == sorted(sent) and sent[0] > 0, sent  # cumulative, one sync a round
            done = [e for e in events if e["event"] == "done"]
            assert len(done) == 1, events
            assert done[0]["syncs"] == ROUNDS and done[0]["commits"] == ROUNDS, done[0]
            finals.append(done[0])
        assert finals[0]["digest"] == finals[1]["digest"], "the replicas ended on different parameters"
        assert min(f["accuracy"] for f in finals) > 0.3, finals  # 10 classes: chance is 0.1
        # one all-reduce of the whole model per round, 2 (N - 1) / N of its bytes each way (computed)
        model_bytes = sum(p.numel() * 4 for p in Worker(swarm.config_for(0)).model.parameters())
        assert finals[0]["sent_bytes"] == finals[0]["received_bytes"] == ROUNDS * model_bytes
    finally:
        for p in procs:
            kill_tree(p.pid, signal.SIGKILL, timeout=10)

"""Checkpoints: round trip, corruption, a crash between files, writes in the background."""

import pytest
import torch

from node.net import checkpoint
from node.protocol.models import build_model
from node.protocol.train import make_optimizer, optimizer_tensors, restore_optimizer


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

"""Training an expert or the router to a step count with checkpoints: resumed after a crash from
the last one made with the same settings, stoppable at a checkpoint, progress as events."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from node.net import checkpoint

log = logging.getLogger("atoll.experts")
Event = Callable[[dict], None]


def train_checkpointed(
    model: torch.nn.Module,
    directory: Path,
    kind: str,
    meta: dict,
    steps: int,
    train: Callable[..., float],
    on_event: Event,
    stop: threading.Event,
    batch_size: int = 0,
) -> str:
    """Train `model` to `steps` with checkpoints in `directory` (resuming from one made with the same `meta`);
    `train(start=, opt_state=, on_checkpoint=, progress=)` runs flow.fit from `start`; returns the final checkpoint's
    model sha256; `batch_size` (images per step) adds images per second to the `trained` event. Raises ValueError
    when `directory` holds a checkpoint with another `meta`, Stopped at the first checkpoint after `stop` is set."""
    saved = checkpoint.load(directory, torch.device("cpu"))
    start, opt_state = 0, None
    if saved is not None:
        model_sd, optim_sd, state = saved
        if state.get("meta") != meta:
            raise ValueError(
                f"{directory} holds a checkpoint of another {kind} ({state.get('meta')}); use another checkpoint_dir"
            )
        model.load_state_dict(model_sd)
        start = int(state["step"])
        opt_state = _unflatten_optim(optim_sd, state["optim"]) if start < steps else None
        log.info("%s: resuming at step %d of %d", kind, start, steps)
    if start >= steps:
        return checkpoint.load(directory, torch.device("cpu"))[2]["sha256"]["model"]
    t0 = time.monotonic()
    report = max(1, steps // 10)

    def on_checkpoint(step, opt):
        flat, layout = _flatten_optim(opt.state_dict())
        checkpoint.save(directory, model.state_dict(), flat, dict(meta=meta, step=step, optim=layout))
        if stop.is_set():
            raise Stopped(step)

    def progress(step, loss):
        if step % report == 0 or step == steps:
            on_event(
                dict(
                    event="train",
                    role=kind,
                    step=step,
                    steps=steps,
                    loss=round(loss, 4),
                    seconds=round(time.monotonic() - t0, 1),
                )
            )

    try:
        loss = train(start=start, opt_state=opt_state, on_checkpoint=on_checkpoint, progress=progress)
    except Stopped as s:
        raise Stopped(s.step) from None
    seconds = time.monotonic() - t0
    done = dict(event="trained", role=kind, steps=steps, loss=round(loss, 4), seconds=round(seconds, 1))
    if batch_size and seconds > 0:
        done["images_per_second"] = round((steps - start) * batch_size / seconds, 1)
    on_event(done)
    return checkpoint.load(directory, torch.device("cpu"))[2]["sha256"]["model"]


class Stopped(Exception):
    """Training stopped on request at a checkpoint, `step` steps in."""

    def __init__(self, step: int):
        """`step`: the training step of the checkpoint it stopped at."""
        super().__init__(f"stopped at step {step}")
        self.step = step


def _flatten_optim(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state dict as named tensors (safetensors) plus a JSON layout."""
    tensors, layout = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        layout["state"][str(pid)] = {}
        for name, v in st.items():
            key = f"{pid}.{name}"
            tensors[key] = v if torch.is_tensor(v) else torch.tensor(v)
            layout["state"][str(pid)][name] = key
    return tensors, layout


def _unflatten_optim(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state = {
        int(pid): {name: tensors[key] for name, key in entries.items()} for pid, entries in layout["state"].items()
    }
    return {"state": state, "param_groups": layout["param_groups"]}

"""Checkpoints: safetensors for tensors plus a small JSON state, crash-safe.

Each save writes `model-<n>.safetensors` and `optim-<n>.safetensors` under fresh names, then
replaces `state.json` (which names both files and their sha256) with one atomic rename, and
only then deletes the previous save's files. A crash at any point leaves `state.json`
naming a complete, intact set: the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
_FILE = re.compile(r"^(model|optim)-[0-9]+\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt (sha256 mismatch), malformed, or written for another node,
    model or optimizer."""

    pass


def _fsync_write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(
    directory: Path, model: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Write `model` and `optim` (copied to CPU) as safetensors under fresh names, atomically replace state.json
    (`state` plus serial, file names and sha256), then delete the previous save's files."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_state(directory) if (directory / STATE).exists() else None
    serial = int(previous.get("serial", 0)) + 1 if isinstance(previous, dict) else 1
    cpu = lambda sd: {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}  # noqa: E731
    names = {"model": f"model-{serial}.safetensors", "optim": f"optim-{serial}.safetensors"}
    _fsync_write(directory / names["model"], lambda p: save_file(cpu(model), str(p)))
    _fsync_write(directory / names["optim"], lambda p: save_file(cpu(optim), str(p)))
    full = dict(state, serial=serial, files=names, sha256={k: _digest(directory / n) for k, n in names.items()})
    tmp = directory / (STATE + ".tmp")
    _fsync_write(tmp, lambda p: p.write_text(json.dumps(full, indent=1)))
    os.replace(tmp, directory / STATE)
    _sync_dir(directory)
    for old in directory.iterdir():  # the previous save's files, now unreferenced
        if _FILE.match(old.name) and old.name not in names.values():
            old.unlink()


def _read_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint state {directory / STATE} is unreadable: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {directory / STATE} is not a JSON object")
    return state


def load(directory: Path, device: torch.device) -> tuple[dict, dict, dict] | None:
    """(model, optim, state) or None when there is no checkpoint; CheckpointError if corrupt."""
    if not (directory / STATE).exists():
        return None
    state = _read_state(directory)
    files, sums = state.get("files"), state.get("sha256")
    if not (
        isinstance(files, dict)
        and isinstance(sums, dict)
        and set(files) == {"model", "optim"}
        and all(isinstance(v, str) and _FILE.match(v) for v in files.values())
    ):
        raise CheckpointError(f"checkpoint state {directory / STATE} does not name its files")
    try:
        for name, fname in files.items():
            if _digest(directory / fname) != sums.get(name):
                raise CheckpointError(f"{fname} in {directory} does not match state.json (corrupt checkpoint)")
        # map_location: tensors go straight to this node's device, whatever device wrote them
        model = load_file(str(directory / files["model"]), device=str(device))
        optim = load_file(str(directory / files["optim"]), device=str(device))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint in {directory} is unreadable: {e}") from e
    return model, optim, state


def resume(directory: Path, worker, peer_id: str) -> tuple[int, float] | None:
    """Load the checkpoint in `directory` into `worker` (node.worker.Worker): (the round to
    resume at, when it was written) or None without one. Raises CheckpointError saying what
    does not fit (another node's, another model or optimizer, malformed)."""
    restored = load(directory, worker.device)
    if restored is None:
        return None
    model_sd, optim_t, state = restored
    if state.get("peer_id") not in (None, peer_id):
        raise CheckpointError(f"checkpoint in {directory} belongs to another node ({state.get('peer_id')})")
    for key, want in worker.checkpoint_identity().items():
        if key in state and state[key] != want:
            raise CheckpointError(
                f"checkpoint in {directory} was written with {key}={state[key]}, the config says {want}: "
                f"use the same setting or another checkpoint_dir"
            )
    r = state.get("round")
    if not isinstance(r, int) or r < 0 or not isinstance(state.get("optim"), dict):
        raise CheckpointError(f"checkpoint state in {directory} is malformed")
    try:
        worker.restore(model_sd, optim_t, state["optim"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint in {directory} does not fit this model/optimizer: {e}") from None
    return r, float(state.get("time", 0.0))


def capture(worker, peer_id: str, next_round: int, accuracy: float | None) -> tuple[dict, dict, dict]:
    """(model, optimizer tensors, state) of `worker` as of `next_round`, copied: what `save`
    writes, safe to write while the worker trains on."""
    from node.train import optimizer_tensors

    optim_t, optim_meta = optimizer_tensors(worker.optimizer)
    state = dict(round=next_round, peer_id=peer_id, accuracy=accuracy, time=time.time(), optim=optim_meta)
    copy = lambda sd: {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}  # noqa: E731
    return copy(worker.full_state()), copy(optim_t), {**state, **worker.checkpoint_identity()}


class Writer:
    """Writes a node's checkpoints on a thread of its own, so a round does not wait for the
    disk: `submit` hands over a copy (see `capture`), the thread saves it with `save` (crash
    safe as ever: the previous checkpoint stays until the new one is complete). A newer
    submission replaces one not yet started, so at most one round's copy waits. `flush` waits
    for the last one and raises what a write raised (CheckpointError, OSError)."""

    def __init__(self, directory: Path, on_written=lambda when: None):
        self.directory, self.on_written = directory, on_written
        self._pending: tuple | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="atoll-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, captured: tuple[dict, dict, dict]) -> None:
        """Queue a captured checkpoint; raises the error of an earlier write, if any."""
        with self._cond:
            self._raise()
            self._pending = captured
            self._cond.notify_all()

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until everything submitted is on disk (at most `timeout` s); raises a write's error."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout=timeout)
            self._raise()
            if not done:
                raise CheckpointError(f"a checkpoint write to {self.directory} took more than {timeout:.0f} s")

    def close(self) -> None:
        """Flush, then stop the thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=10)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                captured, self._pending, self._busy = self._pending, None, True
            try:
                save(self.directory, *captured)
                self.on_written(captured[2]["time"])
            except BaseException as e:  # noqa: BLE001 - handed to the node at its next submit or flush
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

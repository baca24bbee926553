"""Checkpoints: safetensors for tensors plus a small JSON state, written atomically.

Layout in the checkpoint directory: `model.safetensors`, `optim.safetensors`, `state.json`.
Each file is written to a temporary name, fsynced and renamed, and state.json goes last and
names the digest of the model file, so a crash at any point leaves either the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


class CheckpointError(RuntimeError):
    pass


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(directory: Path, model: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cpu = lambda sd: {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}  # noqa: E731
    _atomic_write(directory / "model.safetensors", lambda p: save_file(cpu(model), str(p)))
    _atomic_write(directory / "optim.safetensors", lambda p: save_file(cpu(optim), str(p)))
    full = dict(state, model_sha256=_digest(directory / "model.safetensors"),
                optim_sha256=_digest(directory / "optim.safetensors"))
    _atomic_write(directory / STATE, lambda p: p.write_text(json.dumps(full, indent=1)))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def load(directory: Path, device: torch.device) -> tuple[dict, dict, dict] | None:
    """(model, optim, state) or None when there is no checkpoint; CheckpointError if corrupt."""
    state_path = directory / STATE
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text())
        for name in ("model", "optim"):
            if _digest(directory / f"{name}.safetensors") != state[f"{name}_sha256"]:
                raise CheckpointError(f"{name}.safetensors does not match state.json")
        model = load_file(str(directory / "model.safetensors"), device=str(device))
        optim = load_file(str(directory / "optim.safetensors"), device=str(device))
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint in {directory} is unreadable: {e}") from e
    return model, optim, state

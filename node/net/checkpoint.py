"""Checkpoints: safetensors for tensors plus a small JSON state, crash-safe, the last K kept.

Each save writes `model-<n>.safetensors`, `optim-<n>.safetensors` and `state-<n>.json` (which names both files and
their sha256) under fresh names, then replaces `state.json` (the newest state) with one atomic rename, and only then
deletes the saves older than the newest `keep`. A crash at any point leaves complete, intact sets: never a mix.

Loading takes the newest set whose files match their sha256 and whose model holds only finite values. A set whose
model holds NaN/Inf (a node that saved a diverging model, a disk that flipped bits in a way the digest cannot see
because it was computed after) is refused in one line naming the file and the tensor, and the next older one is
tried; a set whose optimizer state alone is not finite is resumed with a fresh optimizer state, and says so. Model
or optimizer files with no state naming them are refused, never deleted. The optimizer's file also holds the round
protocol's own tensors (DiLoCo's outer momentum), named OUTER + name (node/protocol/worker.py). A write that fails
(ENOSPC, EIO, permissions) removes its own partial files and raises CheckpointError naming the directory and the
cause; the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from node.protocol.train import optimizer_tensors
from node.protocol.worker import OUTER

STATE = "state.json"
_FILE = re.compile(r"^(model|optim)-([0-9]+)\.safetensors$")
_STATE_N = re.compile(r"^state-([0-9]+)\.json$")
FRESH_OPTIMIZER = "fresh_optimizer"  # set in a loaded state whose optimizer tensors were not finite
log = logging.getLogger("atoll.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written: unreadable, corrupt (sha256 mismatch), not finite, malformed,
    written for another node, model or optimizer, or a failed write (its message names the directory and cause)."""


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


def errno_of(e: BaseException) -> int | None:
    """The errno behind a failed write: OSError's, or the one safetensors writes as text ("... (os error 28)")."""
    m = re.search(r"os error (\d+)", str(e))
    code = getattr(e, "errno", None) or (int(m.group(1)) if m else None)
    return code if code in errno.errorcode else None


def cause(e: BaseException) -> str:
    """A failed write's cause in words with its errno name, e.g. "no space left on device (ENOSPC)"."""
    code = errno_of(e)
    if code is not None:
        return f"{os.strerror(code).lower()} ({errno.errorcode[code]})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _serials(directory: Path) -> set[int]:
    """Every serial a model, optimizer or state file in `directory` carries."""
    found = set()
    for p in directory.iterdir():
        m = _FILE.match(p.name) or _STATE_N.match(p.name)
        if m:
            found.add(int(m.groups()[-1]))
    return found


def save(
    directory: Path,
    model: dict[str, torch.Tensor],
    optim: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> None:
    """Write `model` and `optim` (copied to CPU) and `state` (plus serial, file names and sha256) under fresh names,
    atomically replace state.json, then delete the saves older than the newest `keep` (>= 1). Raises CheckpointError
    naming `directory` and the cause when a write fails; the previous checkpoints are then intact."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    written: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / STATE).exists():  # a directory from before state-<n>.json: keep its newest as one
            previous = _read_state(directory)
            numbered = directory / f"state-{previous.get('serial')}.json"
            if isinstance(previous.get("serial"), int) and not numbered.exists():
                _fsync_write(numbered, lambda p: p.write_text(json.dumps(previous)))
        serial = max(_serials(directory), default=0) + 1  # never reuses a name, orphans included
        cpu = lambda sd: {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}  # noqa: E731
        names = {"model": f"model-{serial}.safetensors", "optim": f"optim-{serial}.safetensors"}
        for kind, tensors in (("model", model), ("optim", optim)):
            written.append(directory / names[kind])
            _fsync_write(written[-1], lambda p, t=tensors: save_file(cpu(t), str(p)))
        full = dict(state, serial=serial, files=names, sha256={k: _digest(directory / n) for k, n in names.items()})
        text = json.dumps(full, indent=1)
        written.append(directory / f"state-{serial}.json")
        _fsync_write(written[-1], lambda p: p.write_text(text))
        tmp = directory / (STATE + ".tmp")
        _fsync_write(tmp, lambda p: p.write_text(text))
        os.replace(tmp, directory / STATE)
        written.clear()  # from here on the new save is the checkpoint
        _sync_dir(directory)
        _prune(directory, keep)
    except (OSError, SafetensorError) as e:
        for path in [*written, directory / (STATE + ".tmp")]:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        raise CheckpointError(
            f"cannot write a checkpoint to {directory}: {cause(e)}; the previous checkpoint is kept"
        ) from e


def _prune(directory: Path, keep: int) -> None:
    """Delete every file of the saves older than the newest `keep` complete ones (a state-<n>.json names them)."""
    complete = sorted((int(m.group(1)) for p in directory.iterdir() if (m := _STATE_N.match(p.name))), reverse=True)
    if len(complete) <= keep:
        return
    oldest_kept = complete[keep - 1]
    for p in directory.iterdir():
        m = _FILE.match(p.name) or _STATE_N.match(p.name)
        if m and int(m.groups()[-1]) < oldest_kept:
            p.unlink()


def _read_state(directory: Path, name: str = STATE) -> dict:
    try:
        state = json.loads((directory / name).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint state {directory / name} is unreadable: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {directory / name} is not a JSON object")
    return state


def _states(directory: Path) -> list[str]:
    """The state files to try, newest first: state.json, then state-<n>.json by serial. Raises CheckpointError when
    model or optimizer files lie there with no state naming them (they are never deleted)."""
    numbered = sorted(
        ((int(m.group(1)), p.name) for p in directory.iterdir() if (m := _STATE_N.match(p.name))), reverse=True
    )
    names = [name for _, name in numbered]
    if (directory / STATE).exists():  # the newest; its own numbered copy is the same set
        newest = f"state-{_read_state(directory).get('serial')}.json"
        names = [STATE] + [name for name in names if name != newest]
    if not names:
        orphans = sorted(p.name for p in directory.iterdir() if _FILE.match(p.name))
        if orphans:
            raise CheckpointError(
                f"checkpoint_dir {directory} holds {', '.join(orphans)} but no state.json naming them: restore "
                f"state.json from a backup, or move those files away to start fresh (they are not deleted)"
            )
    return names


def _not_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN/Inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _load_set(directory: Path, name: str, device: torch.device) -> tuple[dict, dict, dict]:
    state = _read_state(directory, name)
    files, sums = state.get("files"), state.get("sha256")
    if not (
        isinstance(files, dict)
        and isinstance(sums, dict)
        and set(files) == {"model", "optim"}
        and all(isinstance(v, str) and _FILE.match(v) for v in files.values())
    ):
        raise CheckpointError(f"checkpoint state {directory / name} does not name its files")
    try:
        for kind, fname in files.items():
            if _digest(directory / fname) != sums.get(kind):
                raise CheckpointError(f"{fname} in {directory} does not match {name} (corrupt checkpoint)")
        # map_location: tensors go straight to this node's device, whatever device wrote them
        model = load_file(str(directory / files["model"]), device=str(device))
        optim = load_file(str(directory / files["optim"]), device=str(device))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint in {directory} is unreadable: {e}") from e
    return model, optim, state


def load(
    directory: Path, device: torch.device, note: Callable[[str], None] = log.warning
) -> tuple[dict, dict, dict] | None:
    """(model, optim, state) of the newest usable checkpoint, or None when there is none. Sets whose model is not
    finite are refused (one `note` line each, naming file and tensor) and older ones tried; a non-finite optimizer
    state gives optim {} and state[FRESH_OPTIMIZER] = True. Raises CheckpointError if the newest set is corrupt or
    malformed, if every set kept is non-finite, or for orphaned model or optimizer files."""
    if not directory.is_dir():
        return None
    refused = []
    names = _states(directory)
    for name in names:
        model, optim, state = _load_set(directory, name, device)
        bad = _not_finite(model)
        if bad is not None:
            refused.append(f"{state['files']['model']}: {bad}")
            note(f"refusing checkpoint {directory / state['files']['model']}: tensor {bad!r} holds NaN/Inf")
            continue
        bad = _not_finite(optim)
        if bad is not None:
            note(
                f"checkpoint {directory / state['files']['optim']}: optimizer tensor {bad!r} holds NaN/Inf: resuming "
                f"with a fresh optimizer state"
            )
            optim, state = {}, dict(state, **{FRESH_OPTIMIZER: True})
        if refused:
            note(f"resuming from the older checkpoint {directory / state['files']['model']}")
        return model, optim, state
    if refused:
        raise CheckpointError(
            f"every checkpoint kept in {directory} holds NaN/Inf ({'; '.join(refused)}): move checkpoint_dir away to "
            f"start fresh"
        )
    return None


def resume(directory: Path, worker, peer_id: str) -> tuple[int, float] | None:
    """Load the checkpoint in `directory` into `worker` (node.protocol.worker.Worker): (the round to
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
    try:  # a non-finite optimizer state (see load) leaves the worker's fresh one in place
        worker.restore(model_sd, None if state.get(FRESH_OPTIMIZER) else optim_t, state["optim"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint in {directory} does not fit this model/optimizer: {e}") from None
    return r, float(state.get("time", 0.0))


def capture(worker, peer_id: str, next_round: int, accuracy: float | None) -> tuple[dict, dict, dict]:
    """(model, optimizer tensors, state) of `worker` as of `next_round`, copied: what `save`
    writes, safe to write while the worker trains on."""
    optim_t, optim_meta = optimizer_tensors(worker.optimizer)
    optim_t.update({OUTER + k: v for k, v in worker.outer.tensors().items()})
    state = dict(round=next_round, peer_id=peer_id, accuracy=accuracy, time=time.time(), optim=optim_meta)
    copy = lambda sd: {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}  # noqa: E731
    return copy(worker.full_state()), copy(optim_t), {**state, **worker.checkpoint_identity()}


class Writer:
    """Writes a node's checkpoints on a thread of its own, so a round does not wait for the
    disk: `submit` hands over a copy (see `capture`), the thread saves it with `save` (crash
    safe as ever: the previous checkpoint stays until the new one is complete). A newer
    submission replaces one not yet started, so at most one round's copy waits. `flush` waits
    for the last one and raises what a write raised (CheckpointError)."""

    def __init__(self, directory: Path, on_written=lambda when: None, keep: int = 2):
        """`directory`: where `save` writes; `on_written(when)`: called after each save with its state's time (s since
        the epoch); `keep`: saves kept on disk (>= 1)."""
        self.directory, self.on_written, self.keep = directory, on_written, keep
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
                save(self.directory, *captured, keep=self.keep)
                self.on_written(captured[2]["time"])
            except BaseException as e:  # noqa: BLE001 - handed to the node at its next submit or flush
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class Checkpointer:
    """A node's checkpoints while it trains: a Writer in the background, and the policy for failed writes (disk full,
    I/O, permissions): one line each, counted in atoll_checkpoint_failures_total{reason}; the node trains on and the
    next checkpoint retries; after `give_up_rounds` rounds with none written, CheckpointError (the node exits 2)."""

    def __init__(self, directory: Path, keep: int, give_up_rounds: int, metrics):
        """`directory`: checkpoint_dir; `keep`: saves kept (>= 1); `give_up_rounds`: rounds without a checkpoint
        written before giving up; `metrics`: the node's NodeMetrics (checkpoint age and failures)."""
        self.directory, self.give_up_rounds, self.metrics = directory, give_up_rounds, metrics
        self.unsaved_since: int | None = None  # the round of the first failed write since the last success
        self._writer = Writer(directory, self._written, keep)

    def submit(self, capture: Callable[[], tuple[dict, dict, dict]], r: int) -> None:
        """Queue `capture()` (see `capture`) as round `r`'s checkpoint; CheckpointError after give_up_rounds none."""
        try:
            self._writer.submit(capture())
        except CheckpointError as e:  # the previous submission's write failed
            self._failed(e, r)
            self._writer.submit(capture())

    def flush(self, timeout: float = 120.0) -> None:
        """Wait for the last submission to be written (Writer.flush)."""
        self._writer.flush(timeout)

    def close(self) -> None:
        """Flush, then stop the writing thread (Writer.close)."""
        self._writer.close()

    def _written(self, when: float) -> None:
        self.metrics.checkpoint_time = when
        if self.unsaved_since is not None:
            log.info("checkpoints are written again to %s", self.directory)
        self.unsaved_since = None

    def _failed(self, e: CheckpointError, r: int) -> None:
        code = errno_of(e.__cause__ or e)
        self.metrics.checkpoint_failures.labels(reason=errno.errorcode[code] if code is not None else "other").inc()
        self.unsaved_since = r if self.unsaved_since is None else self.unsaved_since
        left = self.unsaved_since + self.give_up_rounds - r
        if left <= 0:
            raise CheckpointError(
                f"no checkpoint could be written for {self.give_up_rounds} rounds (checkpoint_give_up_rounds): {e}"
            ) from None
        log.error("%s; training on, retrying at the next checkpoint (%d rounds left before giving up)", e, left)

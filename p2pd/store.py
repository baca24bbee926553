"""The snapshots a node serves, bounded: ``SnapshotStore`` keeps the newest ``keep`` snapshots per kind and drops
older ones (a peer asking for those gets NOT_FOUND and skips this node for that step). Snapshots are encoded (copied
to CPU, digested and serialized into wire parts) once, when published."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

from p2pd.tensors import DEFAULT_CHUNK_BYTES, EncodedSnapshot, SnapshotKey, encode

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a server's messages: > one chunk plus framing; see p2pd/client.py


class SnapshotStore:
    """Thread-safe map SnapshotKey -> PackedSnapshot, newest `keep` per kind."""

    def __init__(
        self, keep: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES, keep_kinds: Mapping[str, int] | None = None
    ):
        """`keep`: snapshots held per kind (>= 1), `keep_kinds` for some kinds instead (e.g. one join state);
        `chunk_bytes`: bytes per wire part of an encoded snapshot (1 to MAX_MESSAGE_BYTES - 4096). Raises ValueError
        for either out of range."""
        if chunk_bytes < 1 or chunk_bytes + 4096 > MAX_MESSAGE_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_MESSAGE_BYTES - 4096}]")
        self.chunk_bytes = chunk_bytes
        self.keep, self.keep_kinds = keep, dict(keep_kinds or {})
        if keep < 1 or any(k < 1 for k in self.keep_kinds.values()):
            raise ValueError("keep must be >= 1")
        self._items: dict[SnapshotKey, EncodedSnapshot] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def publish(
        self,
        key: SnapshotKey,
        state_dict: Mapping[str, torch.Tensor],
        before_visible: Callable[[tuple[str, ...], EncodedSnapshot], None] | None = None,
    ) -> EncodedSnapshot:
        """Encode `state_dict` under `key` (CPU copy, BLAKE3 digest, wire parts of `chunk_bytes`) and drop the oldest
        of that kind beyond `keep`; returns the encoded snapshot. `before_visible(index, snapshot)` runs with the
        index the store will hold (see `index`) before anyone can see the new snapshot: a node signs its record
        there, so a peer that sees the key also finds its digest signed. Raises TypeError or ValueError for a
        value, name or dtype the wire refuses."""
        return self.put(key, encode(state_dict, key.to_pb(), self.chunk_bytes), before_visible)

    def put(
        self,
        key: SnapshotKey,
        packed: EncodedSnapshot,
        before_visible: Callable[[tuple[str, ...], EncodedSnapshot], None] | None = None,
    ) -> EncodedSnapshot:
        """Hold an already encoded snapshot under `key` (see publish): a carrier holds what its
        producer pushed, byte for byte as the producer encoded it."""
        with self._lock:
            items = dict(self._items)
        items[key] = packed
        same_kind = sorted(k for k in items if k.kind == key.kind)
        for old in same_kind[: max(0, len(same_kind) - self.keep_kinds.get(key.kind, self.keep))]:
            del items[old]
        if before_visible is not None:
            before_visible(_index(items), packed)
        with self._changed:
            self._items = items
            self._changed.notify_all()
        return packed

    def wait(self, key: SnapshotKey, timeout: float) -> bool:
        """Block until `key` is held or a later snapshot of its kind is (the node moved past it),
        at most `timeout` seconds; True if one of them happened."""

        def ready() -> bool:
            return key in self._items or any(k.kind == key.kind and k > key for k in self._items)

        with self._changed:
            return self._changed.wait_for(ready, timeout=max(0.0, timeout))

    def get(self, key: SnapshotKey) -> EncodedSnapshot | None:
        """The encoded snapshot under `key`, or None if it was never published or has been dropped."""
        with self._lock:
            return self._items.get(key)

    def keys(self) -> list[SnapshotKey]:
        """Every held snapshot key, sorted."""
        with self._lock:
            return sorted(self._items)

    def index(self) -> tuple[str, ...]:
        """Every held snapshot as "kind:round:step:hexdigest", for the signed peer record."""
        with self._lock:
            return _index(self._items)


def _index(items: Mapping[SnapshotKey, EncodedSnapshot]) -> tuple[str, ...]:
    return tuple(f"{k.kind}:{k.round}:{k.step}:{v.hexdigest}" for k, v in sorted(items.items()))

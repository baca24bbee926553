"""State dicts as a stream of protobuf parts, with no pickle and every input checked.

Stream layout (see proto/swarm.proto): ``header, chunk..., trailer``. Tensors are sent in
ascending name order, each as raw little-endian element bytes cut into chunks of at most
``chunk_bytes``; the first chunk of a tensor names its dtype and shape.

Snapshot digest (BLAKE3, 32 bytes): over, for each tensor in name order,
``name NUL dtype NUL shape-as-comma-list NUL nbytes NUL`` followed by the tensor bytes.
It depends only on the content (not on chunking), is computed once when a snapshot is
packed, and is what a node signs into its PeerRecord as ``model_digest``.

Decoding and every check on a received stream: p2pd/decoding.py.

Codecs (p2pd/codecs.py): a tensor's first chunk may name a codec (``codec``, with ``block``
or ``count``); ``dtype`` and ``shape`` are then the decoded tensor's, the payload is the
codec's bytes, and the digest preamble above has ``codec:block:count NUL`` before ``nbytes``.
A raw tensor's digest is the same as before codecs existed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import blake3
import torch

from p2pd.codecs import CODECS, Coded
from p2pd.errors import ReasonedError
from p2pd.rpc import swarm_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
# gRPC's default receive limit is 4 MiB (4,194,304 bytes) a message: a part is its chunk's
# payload plus the chunk's framing (name up to 256 bytes, dtype, shape, codec fields), so the
# payload stays 16 KiB under it and a stock gRPC client with default settings can fetch any
# snapshot (a 4 MiB payload made parts of 4,194,339 bytes: RESOURCE_EXHAUSTED)
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = GRPC_DEFAULT_MESSAGE_BYTES - 16 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.\-:/]{1,256}$")


class TensorStreamError(ReasonedError, ValueError):
    """A tensor stream that must not be used. `reason` is a short metric label."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. Defaults fit a few-hundred-million-parameter fp32 model."""

    max_total_bytes: int = 2 * 1024**3
    max_tensors: int = 4096
    max_ndim: int = 8
    max_dim: int = 2**31 - 1  # also bounds zero-size tensors, whose byte count says nothing
    dtypes: frozenset[str] = field(default_factory=lambda: frozenset(DTYPES))
    codecs: frozenset[str] = field(default_factory=lambda: frozenset(CODECS))
    allow_non_finite: bool = False


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a PackedSnapshot: name, wire dtype name, shape and its raw element bytes (a read-only view of a
    private CPU copy); for a coded tensor the codec's bytes, with `codec`, `block` and `count` (p2pd/codecs.py)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # raw bytes, read-only, owned by `_keep`
    _keep: torch.Tensor = field(repr=False, compare=False)
    codec: str = ""
    block: int = 0
    count: int = 0

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return self.data.nbytes


@dataclass(frozen=True)
class PackedSnapshot:
    """An immutable, ready-to-stream copy of a state dict."""

    tensors: tuple[PackedTensor, ...]
    digest: bytes

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' payload bytes (no names or framing)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def hexdigest(self) -> str:
        """The BLAKE3 snapshot digest as 64 hex characters."""
        return self.digest.hex()


def _tensor_preamble(
    name: str, dtype: str, shape: Iterable[int], nbytes: int, codec: str = "", block: int = 0, count: int = 0
) -> bytes:
    # a coded tensor's codec field (letters) sits where a raw one has its byte count (digits):
    # no raw tensor's preamble and payload can hash like a coded one's
    coded = f"{codec}:{block}:{count}\0" if codec else ""
    return f"{name}\0{dtype}\0{','.join(map(str, shape))}\0{coded}{nbytes}\0".encode()


def pack(state_dict: Mapping[str, torch.Tensor | Coded]) -> PackedSnapshot:
    """Copy a state dict to CPU bytes (so later training does not change it) and digest it.
    Values may be `Coded` (p2pd/codecs.py: `Codec.compress`), which travel as their payload."""
    hasher = blake3.blake3()
    packed = []
    for name in sorted(state_dict):
        t = state_dict[name]
        if isinstance(t, Coded):  # its payload is the codec's own fresh bytes: no copy
            if not _NAME.fullmatch(name):
                raise ValueError(f"tensor name {name!r} is not allowed on the wire")
            keep = t.payload.detach().cpu().contiguous()
            raw = keep.numpy()
            raw.flags.writeable = False
            view = memoryview(raw)
            hasher.update(_tensor_preamble(name, t.dtype, t.shape, view.nbytes, t.codec, t.block, t.count))
            hasher.update(view)
            packed.append(PackedTensor(name, t.dtype, t.shape, view, keep, t.codec, t.block, t.count))
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"tensor name {name!r} is not allowed on the wire")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not in the wire whitelist")
        dtype = _DTYPE_NAMES[t.dtype]
        # Own a contiguous CPU copy; reshape(-1) first so 0-d tensors can be viewed as bytes.
        cpu = t.detach().to("cpu", copy=True).contiguous().reshape(-1)
        raw = cpu.view(torch.uint8).numpy()
        raw.flags.writeable = False
        view = memoryview(raw)
        hasher.update(_tensor_preamble(name, dtype, t.shape, view.nbytes))
        hasher.update(view)
        packed.append(PackedTensor(name, dtype, tuple(t.shape), view, cpu))
    return PackedSnapshot(tuple(packed), hasher.digest())


def iter_parts(
    snapshot: PackedSnapshot, key: pb.SnapshotKey, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.SnapshotPart]:
    """The wire parts of `snapshot`: header, chunks, trailer."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    yield pb.SnapshotPart(
        header=pb.StreamHeader(key=key, tensor_count=len(snapshot.tensors), total_bytes=snapshot.total_bytes)
    )
    for t in snapshot.tensors:
        offset = 0
        while True:
            end = min(offset + chunk_bytes, t.nbytes)
            chunk = pb.TensorChunk(offset=offset, payload=t.data[offset:end].tobytes())
            if offset == 0:
                chunk.name, chunk.dtype = t.name, t.dtype
                chunk.shape.extend(t.shape)
                if t.codec:
                    chunk.codec, chunk.block, chunk.count = t.codec, t.block, t.count
            yield pb.SnapshotPart(chunk=chunk)
            offset = end
            if offset >= t.nbytes:
                break
    yield pb.SnapshotPart(trailer=pb.StreamTrailer(digest=snapshot.digest))


@dataclass(frozen=True)
class EncodedSnapshot:
    """A snapshot as its serialized wire parts, ready to be written to any number of peers.

    Building protobuf messages around multi-MiB payloads costs ~1.5 ms per MiB here, so it is
    done once at publish time and a fetch only writes these bytes.
    """

    key: pb.SnapshotKey
    digest: bytes
    total_bytes: int  # tensor payload bytes
    parts: tuple[bytes, ...]

    @property
    def wire_bytes(self) -> int:
        """Bytes of all serialized parts, protobuf framing included."""
        return sum(len(p) for p in self.parts)

    @property
    def hexdigest(self) -> str:
        """The BLAKE3 snapshot digest as 64 hex characters."""
        return self.digest.hex()


def encode(
    state_dict: Mapping[str, torch.Tensor | Coded], key: pb.SnapshotKey, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> EncodedSnapshot:
    """pack + serialize every wire part. Holds one copy of the data (the packed copy is dropped)."""
    packed = pack(state_dict)
    parts = tuple(part.SerializeToString() for part in iter_parts(packed, key, chunk_bytes))
    return EncodedSnapshot(key, packed.digest, packed.total_bytes, parts)


# -- addressing ------------------------------------------------------------------------------
KINDS = {
    "model": pb.SNAPSHOT_KIND_MODEL,
    "logits": pb.SNAPSHOT_KIND_LOGITS,
    "delta": pb.SNAPSHOT_KIND_DELTA,
    "estimate": pb.SNAPSHOT_KIND_ESTIMATE,
    "ranks": pb.SNAPSHOT_KIND_RANKS,
    "shard": pb.SNAPSHOT_KIND_SHARD,
    "join": pb.SNAPSHOT_KIND_JOIN,
}
_KIND_NAMES = {v: k for k, v in KINDS.items()}


@dataclass(frozen=True, order=True)
class SnapshotKey:
    """Which published snapshot: (kind, round, gossip step)."""

    kind: str
    round: int
    step: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if not (0 <= self.round < 2**63 and 0 <= self.step < 2**32):
            raise ValueError(f"round/step out of range: {self.round}/{self.step}")

    def to_pb(self) -> pb.SnapshotKey:
        """The protobuf SnapshotKey (kind enum, round, gossip_step)."""
        return pb.SnapshotKey(kind=KINDS[self.kind], round=self.round, gossip_step=self.step)

    @classmethod
    def from_pb(cls, k: pb.SnapshotKey) -> SnapshotKey:
        """The inverse of to_pb; raises ValueError for an unknown kind or a round or step out of range."""
        if k.kind not in _KIND_NAMES:
            raise ValueError(f"unknown snapshot kind {k.kind}")
        return cls(_KIND_NAMES[k.kind], k.round, k.gossip_step)

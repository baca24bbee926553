"""State dicts as a stream of protobuf parts, with no pickle and every input checked.

Stream layout (see proto/swarm.proto): ``header, chunk..., trailer``. Tensors are sent in
ascending name order, each as raw little-endian element bytes cut into chunks of at most
``chunk_bytes``; the first chunk of a tensor names its dtype and shape.

Snapshot digest (BLAKE3, 32 bytes): over, for each tensor in name order,
``name NUL dtype NUL shape-as-comma-list NUL nbytes NUL`` followed by the tensor bytes.
It depends only on the content (not on chunking), is computed once when a snapshot is
packed, and is what a node signs into its PeerRecord as ``model_digest``.

The decoder refuses, with ``TensorStreamError.reason``:
``malformed`` (parts out of order, inconsistent sizes, bad names), ``wrong_key`` (not the
snapshot that was asked for), ``truncated`` (stream
ended early), ``oversize`` (over the byte or tensor-count limit), ``unknown_dtype``,
``bad_shape``, ``digest_mismatch`` (trailer, or the digest the caller expected from a
signed record), ``non_finite`` (NaN/Inf in a floating tensor, after decoding),
``unknown_codec`` and ``bad_codec``.

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
import numpy as np
import torch

from p2pd.codecs import CODECS, CODED_DTYPES, CodecError, Coded, payload_bytes
from p2pd.codecs import decode as decode_coded
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


class StreamDecoder:
    """Rebuilds a state dict from parts, checking everything. Use `feed` then `finish`."""

    def __init__(
        self,
        limits: Limits = Limits(),
        expected_digest: bytes | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
        expected_key: pb.SnapshotKey | None = None,
    ):
        """`expected_key`: the key that was asked for; a stream announcing another is refused
        (`wrong_key`), so a peer cannot answer with an older snapshot.

        `into`: optional CPU tensors to decode into when name, dtype and shape match (a
        node keeps one such set per neighbour, which saves faulting in fresh memory every
        round). If decoding fails, their contents are undefined."""
        self.limits = limits
        self.expected_digest = expected_digest
        self.into = into or {}
        self.expected_key = expected_key
        self._used_storage: set[int] = set()
        self.header: pb.StreamHeader | None = None
        self.digest: bytes | None = None
        self.bytes_received = 0  # payload bytes, for accounting
        self._hasher = blake3.blake3()
        self._tensors: dict[str, torch.Tensor] = {}
        self._current: tuple[str, str, tuple[int, ...], np.ndarray] | None = None
        self._coded: pb.TensorChunk | None = None  # the current tensor's codec fields, if coded
        self._decoded = 0  # bytes of the decoded tensors: bounded like the wire bytes
        self._filled = 0
        self._declared = 0
        self._last_name = ""
        self._done = False

    def feed(self, part: pb.SnapshotPart) -> None:
        """Check and consume one parsed SnapshotPart; raises TensorStreamError (reasons in the module docstring) on the
        first problem."""
        which = part.WhichOneof("part")
        if which == "chunk":
            self._check_state("chunk")
            self._on_chunk(part.chunk, part.chunk.payload)
        else:
            self._check_state(which)
            if which == "header":
                self._on_header(part.header)
            else:
                self._on_trailer(part.trailer)

    def feed_bytes(self, raw: bytes) -> None:
        """Feed one serialized SnapshotPart. Chunk payloads are used in place (no copy)."""
        split = _split_chunk(raw)
        if split is None:  # header, trailer, or a chunk encoded unusually: let protobuf parse it
            try:
                part = pb.SnapshotPart.FromString(raw)
            except Exception as e:  # protobuf's DecodeError; any junk must become our error
                raise TensorStreamError("malformed", f"undecodable part: {e}") from None
            self.feed(part)
            return
        meta, payload = split
        self._check_state("chunk")
        self._on_chunk(meta, payload)

    def _check_state(self, which: str | None) -> None:
        if self._done:
            raise TensorStreamError("malformed", "data after the trailer")
        if which is None:
            raise TensorStreamError("malformed", "empty part")
        if which != "header" and self.header is None:
            raise TensorStreamError("malformed", "stream does not start with a header")

    def finish(self) -> dict[str, torch.Tensor]:
        """The decoded state dict; raises `truncated` if the stream did not complete."""
        if not self._done:
            got = len(self._tensors)
            want = self.header.tensor_count if self.header else "?"
            raise TensorStreamError("truncated", f"stream ended after {got}/{want} tensors, no trailer")
        return self._tensors

    # -- parts -----------------------------------------------------------------------------
    def _on_header(self, h: pb.StreamHeader) -> None:
        if self.header is not None:
            raise TensorStreamError("malformed", "second header")
        if self.expected_key is not None and h.key != self.expected_key:
            raise TensorStreamError(
                "wrong_key",
                f"asked for round {self.expected_key.round} step {self.expected_key.gossip_step} "
                f"kind {self.expected_key.kind}, got {h.key.round}/{h.key.gossip_step}/{h.key.kind}",
            )
        if h.total_bytes > self.limits.max_total_bytes:
            raise TensorStreamError("oversize", f"{h.total_bytes} bytes > limit {self.limits.max_total_bytes}")
        if h.tensor_count > self.limits.max_tensors:
            raise TensorStreamError("oversize", f"{h.tensor_count} tensors > limit {self.limits.max_tensors}")
        self.header = h

    def _on_chunk(self, c: pb.TensorChunk, payload: bytes | memoryview) -> None:
        n = len(payload)
        if self._current is None:  # must be the first chunk of a new tensor
            if c.offset != 0:
                raise TensorStreamError("malformed", f"tensor data at offset {c.offset} before its first chunk")
            self._start_tensor(c)
        elif c.name or c.offset > self._filled:  # next tensor started, or bytes went missing
            raise TensorStreamError(
                "truncated", f"tensor {self._current[0]!r} got {self._filled}/{self._current[3].nbytes} bytes"
            )
        elif c.dtype or c.shape or c.codec or c.offset != self._filled:
            raise TensorStreamError("malformed", f"tensor {self._current[0]!r}: unexpected chunk at {c.offset}")
        name, dtype, shape, buf = self._current
        if self._filled + n > buf.nbytes:
            raise TensorStreamError("oversize", f"{name}: more bytes than its shape allows")
        buf[self._filled : self._filled + n] = np.frombuffer(payload, dtype=np.uint8)
        self._hasher.update(payload)
        self._filled += n
        self.bytes_received += n
        if self._filled == buf.nbytes:
            self._finish_tensor()

    def _start_tensor(self, c: pb.TensorChunk) -> None:
        if len(self._tensors) >= self.header.tensor_count:
            raise TensorStreamError("oversize", f"more tensors than the {self.header.tensor_count} announced")
        if not _NAME.fullmatch(c.name):
            raise TensorStreamError("malformed", f"bad tensor name {c.name[:64]!r}")
        if c.name <= self._last_name:
            raise TensorStreamError("malformed", f"tensor {c.name!r} duplicated or out of name order")
        if c.dtype not in self.limits.dtypes:
            raise TensorStreamError("unknown_dtype", f"{c.name}: dtype {c.dtype[:32]!r} is not accepted")
        shape = tuple(c.shape)
        if len(shape) > self.limits.max_ndim or any(d < 0 or d > self.limits.max_dim for d in shape):
            raise TensorStreamError("bad_shape", f"{c.name}: shape {shape[:16]}")
        numel = int(np.prod(shape, dtype=object))  # exact, no int64 overflow
        nbytes = _ITEMSIZE[c.dtype] * numel
        coded = bool(c.codec or c.block or c.count)
        # a coded tensor is decoded through float32, whatever its dtype
        self._decoded += max(nbytes, 4 * numel) if coded else nbytes
        if self._decoded > self.limits.max_total_bytes:
            raise TensorStreamError(
                "oversize", f"{c.name}: decodes past the limit of {self.limits.max_total_bytes} bytes"
            )
        self._coded = None
        if coded:
            if c.codec not in self.limits.codecs:
                raise TensorStreamError("unknown_codec", f"{c.name}: codec {c.codec[:32]!r} is not accepted")
            if c.dtype not in CODED_DTYPES:
                raise TensorStreamError("bad_codec", f"{c.name}: a {c.codec} tensor cannot decode to {c.dtype}")
            try:
                nbytes = payload_bytes(c.codec, numel, c.block, c.count)
            except CodecError as e:
                raise TensorStreamError(e.reason, f"{c.name}: {e}") from None
            self._coded = c
        if self._declared + nbytes > self.header.total_bytes:
            raise TensorStreamError(
                "oversize", f"{c.name}: tensors declare more than the {self.header.total_bytes} bytes announced"
            )
        self._declared += nbytes
        self._last_name = c.name
        self._hasher.update(_tensor_preamble(c.name, c.dtype, shape, nbytes, c.codec, c.block, c.count))
        buf = (
            torch.empty(nbytes, dtype=torch.uint8).numpy()
            if self._coded is not None
            else self._buffer(c.name, DTYPES[c.dtype], shape, nbytes)
        )
        self._current = (c.name, c.dtype, shape, buf)
        self._filled = 0

    def _buffer(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
        t = self.into.get(name)
        if (
            t is not None
            and t.dtype == dtype
            and tuple(t.shape) == shape
            and t.device.type == "cpu"
            and t.is_contiguous()
            and nbytes > 0
            and t.untyped_storage().data_ptr() not in self._used_storage  # tied weights share one
        ):
            self._used_storage.add(t.untyped_storage().data_ptr())
            return t.detach().reshape(-1).view(torch.uint8).numpy()
        # torch's allocator faults fresh pages in far faster than numpy's here (THP)
        return torch.empty(nbytes, dtype=torch.uint8).numpy()

    def _finish_tensor(self) -> None:
        name, dtype, shape, buf = self._current
        try:
            if self._coded is not None:
                c = self._coded
                t = decode_coded(Coded(c.codec, dtype, shape, torch.from_numpy(buf), c.block, c.count))
            elif buf.nbytes == 0:  # numpy gives empty arrays a zero stride that torch cannot view
                t = torch.empty(shape, dtype=DTYPES[dtype])
            else:
                t = torch.from_numpy(buf).view(DTYPES[dtype]).reshape(shape)
        except RuntimeError as e:  # e.g. stride overflow for absurd zero-size shapes
            raise TensorStreamError("bad_shape", f"{name}: {e}") from None
        except CodecError as e:
            raise TensorStreamError(e.reason, f"{name}: {e}") from None
        if not self.limits.allow_non_finite and not _all_finite(t):
            raise TensorStreamError("non_finite", f"{name} holds NaN or Inf")
        self._tensors[name] = t
        self._current = None

    def _on_trailer(self, tr: pb.StreamTrailer) -> None:
        if self._current is not None:  # a zero-byte tensor is complete after its first chunk
            raise TensorStreamError("truncated", f"tensor {self._current[0]!r} incomplete at the trailer")
        if len(self._tensors) != self.header.tensor_count or self._declared != self.header.total_bytes:
            raise TensorStreamError(
                "truncated",
                f"{len(self._tensors)}/{self.header.tensor_count} tensors, "
                f"{self._declared}/{self.header.total_bytes} bytes",
            )
        digest = self._hasher.digest()
        if tr.digest != digest:
            raise TensorStreamError("digest_mismatch", "content does not match the trailer digest")
        if self.expected_digest is not None and digest != self.expected_digest:
            raise TensorStreamError("digest_mismatch", "content does not match the digest the peer signed")
        self.digest = digest
        self._done = True


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(buf):
            raise IndexError
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    raise IndexError


def _split_chunk(raw: bytes) -> tuple[pb.TensorChunk, memoryview] | None:
    """Fast path for SnapshotPart{chunk}: return (chunk without payload, payload view).

    protobuf's Python API copies a bytes field on every access, and the parse copies it once
    more; for multi-MiB payloads those copies cost as much as the network. This reads just the
    wire framing: the small fields are re-encoded and parsed by protobuf, the payload is a
    view into `raw`. Anything unexpected returns None and the caller uses protobuf instead.
    """
    buf = memoryview(raw)
    try:
        if len(buf) < 2 or buf[0] != 0x12:  # field 2 (chunk), length-delimited
            return None
        size, pos = _varint(buf, 1)
        if pos + size != len(buf):
            return None
        meta, payload = bytearray(), None
        while pos < len(buf):
            start = pos
            tag, pos = _varint(buf, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 2:
                length, pos = _varint(buf, pos)
                if pos + length > len(buf):
                    return None
                if field == 5:
                    if payload is not None:
                        return None
                    payload = buf[pos : pos + length]
                    pos += length
                    continue
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return None
            if pos > len(buf):
                return None
            meta += buf[start:pos]
        chunk = pb.TensorChunk.FromString(bytes(meta))
    except Exception:  # IndexError from _varint, DecodeError from protobuf
        return None
    return chunk, payload if payload is not None else memoryview(b"")


def _all_finite(t: torch.Tensor) -> bool:
    """True for non-float tensors; else no NaN/Inf. min and max propagate NaN and expose Inf,
    and a reduction is much cheaper than isfinite().all(), which materialises a mask. numpy's
    single-threaded reduction is used where it can: torch's OpenMP reduction slows down ~6x
    when the gRPC threads and the reader thread compete for the same two cores."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    a = t.numpy()
    return bool(np.isfinite(a.min())) and bool(np.isfinite(a.max()))


def decode(
    parts: Iterable[pb.SnapshotPart],
    limits: Limits = Limits(),
    expected_digest: bytes | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
    expected_key: pb.SnapshotKey | None = None,
):
    """Decode a whole stream; returns (state_dict, digest)."""
    dec = StreamDecoder(limits, expected_digest, into, expected_key)
    for part in parts:
        dec.feed(part)
    return dec.finish(), dec.digest


# -- addressing ------------------------------------------------------------------------------
KINDS = {
    "model": pb.SNAPSHOT_KIND_MODEL,
    "logits": pb.SNAPSHOT_KIND_LOGITS,
    "delta": pb.SNAPSHOT_KIND_DELTA,
    "estimate": pb.SNAPSHOT_KIND_ESTIMATE,
    "ranks": pb.SNAPSHOT_KIND_RANKS,
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

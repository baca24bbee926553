"""Decoding a received tensor stream (p2pd/tensors.py's layout), with every input checked.

The decoder refuses, with ``TensorStreamError.reason``:
``malformed`` (parts out of order, inconsistent sizes, bad names), ``wrong_key`` (not the
snapshot that was asked for), ``truncated`` (stream
ended early), ``oversize`` (over the byte or tensor-count limit), ``unknown_dtype``,
``bad_shape``, ``digest_mismatch`` (trailer, or the digest the caller expected from a
signed record), ``non_finite`` (NaN/Inf in a floating tensor, after decoding),
``unknown_codec`` and ``bad_codec``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import blake3
import numpy as np
import torch

from p2pd.codecs import CODED_DTYPES, CodecError, Coded, payload_bytes
from p2pd.codecs import decode as decode_coded
from p2pd.rpc import swarm_pb2 as pb
from p2pd.tensors import _ITEMSIZE, _NAME, DTYPES, Limits, TensorStreamError, _tensor_preamble


def first_chunk(c: pb.TensorChunk, limits: Limits) -> tuple[tuple[int, ...], int, int, bool]:
    """What the first chunk of a tensor declares, checked against `limits`: (shape, element count, payload bytes,
    whether it is coded). Raises TensorStreamError: `malformed` (a bad name), `unknown_dtype`, `bad_shape`,
    `unknown_codec`, `bad_codec` (a codec that cannot decode to that dtype, or sizes that do not add up)."""
    if not _NAME.fullmatch(c.name):
        raise TensorStreamError("malformed", f"bad tensor name {c.name[:64]!r}")
    if c.dtype not in limits.dtypes:
        raise TensorStreamError("unknown_dtype", f"{c.name}: dtype {c.dtype[:32]!r} is not accepted")
    shape = tuple(c.shape)
    if len(shape) > limits.max_ndim or any(d < 0 or d > limits.max_dim for d in shape):
        raise TensorStreamError("bad_shape", f"{c.name}: shape {shape[:16]}")
    numel = int(np.prod(shape, dtype=object))  # exact, no int64 overflow
    coded = bool(c.codec or c.block or c.count)
    if not coded:
        return shape, numel, _ITEMSIZE[c.dtype] * numel, False
    if c.codec not in limits.codecs:
        raise TensorStreamError("unknown_codec", f"{c.name}: codec {c.codec[:32]!r} is not accepted")
    if c.dtype not in CODED_DTYPES:
        raise TensorStreamError("bad_codec", f"{c.name}: a {c.codec} tensor cannot decode to {c.dtype}")
    try:
        return shape, numel, payload_bytes(c.codec, numel, c.block, c.count), True
    except CodecError as e:
        raise TensorStreamError(e.reason, f"{c.name}: {e}") from None


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
        if c.name <= self._last_name:
            raise TensorStreamError("malformed", f"tensor {c.name!r} duplicated or out of name order")
        shape, numel, nbytes, coded = first_chunk(c, self.limits)
        # a coded tensor is decoded through float32, whatever its dtype
        self._decoded += max(_ITEMSIZE[c.dtype] * numel, 4 * numel) if coded else nbytes
        if self._decoded > self.limits.max_total_bytes:
            raise TensorStreamError(
                "oversize", f"{c.name}: decodes past the limit of {self.limits.max_total_bytes} bytes"
            )
        self._coded = c if coded else None
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

"""Tensor codecs for the wire: fewer bytes per snapshot, every decoded value checked.

A floating tensor that a `Codec` applies to travels as a `Coded`: the codec's name, the
decoded dtype and shape, and a flat uint8 payload (little-endian):

- ``fp16``: IEEE half precision, values clamped to +-65504 as hivemind's Float16Compression
  does; numel x 2 bytes. Relative error <= 2^-11 down to 6.1e-5, below which it becomes
  absolute (subnormals; under 6e-8 values become 0): small differences lose digits, which
  error feedback sends later.
- ``bf16``: bfloat16 (float32's range, 8 mantissa bits); numel x 2 bytes. Relative error <= 2^-8.
- ``int8``: blockwise absmax quantisation (as in Dettmers et al., 8-bit optimizers): the flat
  tensor in blocks of ``block`` values, each sent as its absmax ``s`` (float32) and
  round(127 x / s) (int8); nblocks x 4 + numel bytes. Error per element <= s / 254.
- ``topk``: top-k sparsification: the ``count`` entries of largest magnitude as int32
  indices (ascending, unique) then their values in fp16 (clamped as above); count x 6 bytes.
  The others decode as 0, which is why top-k is meant for differences with error feedback
  (CHOCO-SGD), where the fp16 rounding of the values is fed back too.
- ``topk2bit``: top-k per chunk with 2-bit values, as SparseLoCo compresses pseudo-gradients: the flat tensor in
  chunks of ``block`` values (at most 65536); in each, the ``count`` entries of largest magnitude (all of a
  shorter last chunk's, if it has fewer) as uint16 offsets within the chunk (ascending), and their values as 2-bit
  codes of the uniform levels {-s, -s/3, s/3, s}, s the chunk's largest kept magnitude (float32). Bytes: nchunks x
  4 + kept x 2 + ceil(kept / 4). Meant for differences with error feedback, which sends the rounding later.

The size rule (`Codec.applies`): integer tensors, tensors under ``min_elements`` values (biases,
norm weights) and normalisation statistics (``running_mean``/``running_var``) are sent raw.

Why not hivemind.compression: its blockwise 8-bit codec needs bitsandbytes (not a dependency,
CUDA-centric), and its decoders trust their input; these are a few lines of torch each, and
`decode` refuses bad scales, indices out of range or out of order, and wrong sizes with a
reason (`CodecError.reason`: ``unknown_codec`` or ``bad_codec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from p2pd.errors import ReasonedError

CODECS = ("fp16", "bf16", "int8", "topk", "topk2bit")
CODED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP16_MAX = 65504.0
MIN_BLOCK, MAX_BLOCK = 16, 1 << 20
MAX_CHUNK = 1 << 16  # topk2bit: offsets within a chunk are uint16


class CodecError(ReasonedError, ValueError):
    """A coded tensor that cannot be decoded; `reason` is ``unknown_codec`` or ``bad_codec``."""


@dataclass(frozen=True)
class Coded:
    """One tensor as it travels under a codec: `codec` (one of CODECS), `dtype` (the decoded
    tensor's dtype name, a key of CODED_DTYPES), `shape` (decoded), `payload` (uint8 (nbytes,),
    CPU), `block` (int8: values per scale; topk2bit: values per chunk) and `count` (topk: values kept; topk2bit:
    values kept per chunk)."""

    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload: torch.Tensor
    block: int = 0
    count: int = 0

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire."""
        return int(self.payload.numel())


def payload_bytes(codec: str, numel: int, block: int = 0, count: int = 0) -> int:
    """Payload bytes of a coded tensor of `numel` values. Raises CodecError for an unknown codec
    or arguments out of range (a block size outside [16, 2^20], more values kept than exist)."""
    if codec not in IMPLEMENTATIONS:
        raise CodecError("unknown_codec", f"codec {codec[:32]!r} is not one of {', '.join(CODECS)}")
    return IMPLEMENTATIONS[codec].payload_bytes(numel, block, count)


@dataclass(frozen=True)
class Codec:
    """What a node sends: `name` none or one of CODECS, `ratio` (topk, topk2bit: the share of values
    kept, in (0, 1]), `block` (int8: values per scale; topk2bit: values per chunk, at most 65536), `min_elements`
    (smaller tensors go raw).
    Raises ValueError for values out of range."""

    name: str = "none"
    ratio: float = 0.01
    block: int = 256
    min_elements: int = 256

    def __post_init__(self):
        if self.name != "none" and self.name not in CODECS:
            raise ValueError(f"codec must be none or one of {', '.join(CODECS)}, got {self.name!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"topk ratio must be in (0, 1], got {self.ratio}")
        if not MIN_BLOCK <= self.block <= MAX_BLOCK:
            raise ValueError(f"int8 block must be in [{MIN_BLOCK}, {MAX_BLOCK}], got {self.block}")

    def applies(self, name: str, t: torch.Tensor) -> bool:
        """Whether tensor `name` travels coded (the size rule in the module docstring)."""
        return (
            self.name != "none"
            and t.dtype in CODED_DTYPES.values()
            and self.min_elements <= t.numel() < 2**31
            and not name.endswith(("running_mean", "running_var"))
        )

    def encode(self, t: torch.Tensor) -> Coded:
        """`t` (floating, any shape and device) under this codec, payload on the CPU."""
        x = t.detach().to("cpu", torch.float32).reshape(-1)
        dtype = next(k for k, v in CODED_DTYPES.items() if v == t.dtype)
        shape = tuple(t.shape)
        if self.name not in IMPLEMENTATIONS:
            raise ValueError("codec none encodes nothing")
        payload, block, count = IMPLEMENTATIONS[self.name].encode(x, self)
        return Coded(self.name, dtype, shape, payload, block=block, count=count)

    def compress(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | Coded]:
        """`state` with every tensor the size rule picks coded, the others as they are."""
        return {k: self.encode(v) if self.applies(k, v) else v for k, v in state.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t`, a tensor the codec just computed (so nothing else holds it)."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int32 positions of the k entries of x (1-d) of largest magnitude. A k-th value
    selection and one pass instead of a full top-k sort (ties broken by position)."""
    a = x.abs()
    if k >= len(a):
        return torch.arange(len(a), dtype=torch.int32)
    threshold = torch.kthvalue(a, len(a) - k + 1).values
    above = (a > threshold).nonzero().reshape(-1)
    if len(above) < k:  # entries equal to the threshold fill the rest, first ones first
        equal = (a == threshold).nonzero().reshape(-1)[: k - len(above)]
        above = torch.cat([above, equal]).sort().values
    return above.to(torch.int32)


def decode(c: Coded) -> torch.Tensor:
    """The tensor `c` stands for, in its dtype and shape (CPU). Raises CodecError for an unknown
    codec or dtype, a payload of the wrong size, int8 scales that are negative or not finite or
    a value of -128, topk indices out of range, repeated or out of order. NaN/Inf in decoded
    values are left to the caller's finiteness check."""
    if c.dtype not in CODED_DTYPES:
        raise CodecError("bad_codec", f"a {c.codec} tensor cannot decode to {c.dtype[:32]!r}")
    numel = math.prod(c.shape)
    if c.payload.dtype != torch.uint8 or c.payload.numel() != payload_bytes(c.codec, numel, c.block, c.count):
        raise CodecError("bad_codec", f"{c.codec} payload of {c.payload.numel()} bytes for shape {c.shape}")
    x = IMPLEMENTATIONS[c.codec].decode(c.payload.contiguous(), numel, c.block, c.count)
    return x.to(CODED_DTYPES[c.dtype]).reshape(c.shape)


def decompress(state: Mapping[str, torch.Tensor | Coded]) -> dict[str, torch.Tensor]:
    """`state` with every Coded value decoded. Raises CodecError."""
    return {k: decode(v) if isinstance(v, Coded) else v for k, v in state.items()}


class WireCodec(Protocol):
    """One codec of the wire (see the module docstring): its payload size, and its encoding of a flat float32 tensor
    and back. Registered by name in IMPLEMENTATIONS; a node's `Codec` picks one."""

    def payload_bytes(self, numel: int, block: int, count: int) -> int:
        """Bytes of the payload of `numel` values; raises CodecError for `block`/`count` out of range."""

    def encode(self, x: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, int, int]:
        """(uint8 payload, block, count) of the flat float32 CPU tensor `x` under `codec`'s settings."""

    def decode(self, payload: torch.Tensor, numel: int, block: int, count: int) -> torch.Tensor:
        """The flat float32 tensor of `numel` values a payload of the right size stands for; raises CodecError for
        values a sender never produces."""


class _Half:
    """fp16 or bf16: every value in 2 bytes."""

    def __init__(self, dtype: torch.dtype):
        """`dtype`: torch.float16 (values clamped to +-65504) or torch.bfloat16."""
        self.dtype = dtype

    def payload_bytes(self, numel: int, block: int, count: int) -> int:
        """2 bytes a value."""
        return 2 * numel

    def encode(self, x: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, int, int]:
        """Each value rounded to the half type."""
        half = x.clamp(-_FP16_MAX, _FP16_MAX).to(self.dtype) if self.dtype == torch.float16 else x.to(self.dtype)
        return _bytes(half), 0, 0

    def decode(self, payload: torch.Tensor, numel: int, block: int, count: int) -> torch.Tensor:
        """Each value back to float32."""
        return payload.view(self.dtype).float()


class _Int8:
    """Blockwise absmax int8: per block of `block` values a float32 scale, then the int8 values."""

    def payload_bytes(self, numel: int, block: int, count: int) -> int:
        """4 bytes a block and 1 a value; a block larger than the tensor would make a few wire bytes decode into a
        large buffer, so it is refused."""
        if not MIN_BLOCK <= block <= min(MAX_BLOCK, max(MIN_BLOCK, numel)):
            raise CodecError("bad_codec", f"int8 block size {block} outside [{MIN_BLOCK}, max(16, {numel} values)]")
        return 4 * math.ceil(numel / block) + numel

    def encode(self, x: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, int, int]:
        """Scales then round(127 x / scale)."""
        block = min(codec.block, max(MIN_BLOCK, len(x)))
        blocks = torch.nn.functional.pad(x, (0, (-len(x)) % block)).view(-1, block)
        scales = blocks.abs().amax(dim=1)
        q = torch.round(blocks * (127.0 / scales.clamp_min(1e-30)).unsqueeze(1)).to(torch.int8)
        return torch.cat([_bytes(scales), _bytes(q.reshape(-1)[: len(x)])]), block, 0

    def decode(self, payload: torch.Tensor, numel: int, block: int, count: int) -> torch.Tensor:
        """Refuses scales that are negative or not finite, and the value -128 (never sent)."""
        nblocks = math.ceil(numel / block)
        scales = payload[: 4 * nblocks].view(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError("bad_codec", "int8 scales must be finite and >= 0")
        q = payload[4 * nblocks :].view(torch.int8)
        if numel and int(q.min()) == -128:
            raise CodecError("bad_codec", "int8 value -128 is never sent")
        step = scales / 127.0
        x = q.to(torch.float32)  # exactly numel values: the tail block is shorter
        full = (numel // block) * block
        x[:full].view(-1, block).mul_(step[: numel // block].unsqueeze(1))
        if full < numel:
            x[full:].mul_(step[-1])
        return x


class _TopK:
    """Top-k: the `count` entries of largest magnitude as ascending int32 indices, then their fp16 values."""

    def payload_bytes(self, numel: int, block: int, count: int) -> int:
        """6 bytes a value kept."""
        if not 0 < count <= numel or numel >= 2**31:
            raise CodecError("bad_codec", f"topk keeps {count} of {numel} values")
        return 6 * count

    def encode(self, x: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, int, int]:
        """The ceil(ratio x numel) largest in magnitude."""
        k = max(1, math.ceil(codec.ratio * len(x)))
        idx = _top(x, k)
        values = x[idx.long()].clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        return torch.cat([_bytes(idx), _bytes(values)]), 0, k

    def decode(self, payload: torch.Tensor, numel: int, block: int, count: int) -> torch.Tensor:
        """Zeros but at the indices; refuses indices out of range, repeated or out of order."""
        idx = payload[: 4 * count].view(torch.int32).long()
        if bool((idx < 0).any()) or bool((idx >= numel).any()):
            raise CodecError("bad_codec", f"topk index out of range [0, {numel})")
        if count > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise CodecError("bad_codec", "topk indices must be ascending and unique")
        x = torch.zeros(numel, dtype=torch.float32)
        x[idx] = payload[4 * count :].view(torch.float16).float()
        return x


class _TopK2Bit:
    """Top-k per chunk with 2-bit values (see the module docstring): chunk scales (float32), then the kept values'
    uint16 offsets within their chunks, then their 2-bit codes, four to a byte (first value in the low bits)."""

    @staticmethod
    def kept(numel: int, block: int, count: int) -> tuple[int, int]:
        """(chunks, values kept) of `numel` values in chunks of `block`, `count` kept per chunk."""
        nchunks = math.ceil(numel / block)
        last = numel - (nchunks - 1) * block
        return nchunks, (nchunks - 1) * count + min(count, last)

    def payload_bytes(self, numel: int, block: int, count: int) -> int:
        """4 bytes a chunk, 2 a value kept and a quarter byte for its code."""
        if not MIN_BLOCK <= block <= min(MAX_CHUNK, max(MIN_BLOCK, numel)) or not 0 < count <= block:
            raise CodecError("bad_codec", f"topk2bit keeps {count} of chunks of {block} ({numel} values)")
        nchunks, kept = self.kept(numel, block, count)
        return 4 * nchunks + 2 * kept + math.ceil(kept / 4)

    def encode(self, x: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, int, int]:
        """Per chunk, the ceil(ratio x block) largest in magnitude, each rounded to the nearest of four levels."""
        block = min(codec.block, MAX_CHUNK, max(MIN_BLOCK, len(x)))
        count = max(1, math.ceil(codec.ratio * block))
        nchunks, _ = self.kept(len(x), block, count)
        full = (len(x) // block) * block
        offsets, scales, codes = [], [], []

        def keep(rows: torch.Tensor, k: int) -> None:  # rows (chunks, length): their k largest, coded
            idx = rows.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            v = rows.gather(1, idx)
            scale = v.abs().amax(dim=1)
            q = torch.round(v / scale.clamp_min(1e-30).unsqueeze(1) * 1.5 + 1.5).clamp(0, 3)
            offsets.append(idx.reshape(-1))
            scales.append(scale)
            codes.append(q.reshape(-1).to(torch.uint8))

        if full:
            keep(x[:full].view(-1, block), count)
        if full < len(x):
            keep(x[full:].unsqueeze(0), min(count, len(x) - full))
        q = torch.cat(codes)
        q = torch.nn.functional.pad(q, (0, (-len(q)) % 4)).view(-1, 4)
        packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
        offs = torch.cat(offsets).to(torch.int32).to(torch.int16)  # uint16 offsets, stored as their 16 bits
        scales = torch.cat(scales)
        if len(scales) != nchunks:
            raise AssertionError("topk2bit: one scale a chunk")
        return torch.cat([_bytes(scales.float()), _bytes(offs), packed.reshape(-1)]), block, count

    def decode(self, payload: torch.Tensor, numel: int, block: int, count: int) -> torch.Tensor:
        """Zeros but at the kept offsets; refuses scales that are negative or not finite, and offsets out of their
        chunk or not ascending within it."""
        nchunks, kept = self.kept(numel, block, count)
        scales = payload[: 4 * nchunks].view(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError("bad_codec", "topk2bit scales must be finite and >= 0")
        offs = payload[4 * nchunks : 4 * nchunks + 2 * kept].view(torch.int16).to(torch.int64) & 0xFFFF
        packed = payload[4 * nchunks + 2 * kept :]
        q = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:kept]
        per = torch.full((nchunks,), count, dtype=torch.int64)
        per[-1] = kept - (nchunks - 1) * count
        chunk = torch.repeat_interleave(torch.arange(nchunks), per)
        length = torch.full((nchunks,), block, dtype=torch.int64)
        length[-1] = numel - (nchunks - 1) * block
        if bool((offs >= length[chunk]).any()):
            raise CodecError("bad_codec", "topk2bit offset outside its chunk")
        starts = torch.cumsum(per, 0) - per
        first = torch.zeros(kept, dtype=torch.bool)
        first[starts] = True
        if kept > 1 and not bool((offs[1:] > offs[:-1])[~first[1:]].all()):
            raise CodecError("bad_codec", "topk2bit offsets must be ascending and unique within a chunk")
        x = torch.zeros(numel, dtype=torch.float32)
        x[chunk * block + offs] = (q.to(torch.float32) - 1.5) / 1.5 * scales[chunk]
        return x


# every codec by its name on the wire (and in comm.codec); CODECS is this table's names
IMPLEMENTATIONS: dict[str, WireCodec] = {
    "fp16": _Half(torch.float16),
    "bf16": _Half(torch.bfloat16),
    "int8": _Int8(),
    "topk": _TopK(),
    "topk2bit": _TopK2Bit(),
}
assert tuple(IMPLEMENTATIONS) == CODECS

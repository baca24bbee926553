"""Codecs on the wire (p2pd/codecs.py): each round-trips within its stated error bound, counts
the bytes it promises, and a corrupted payload is refused with a reason."""

import math

import pytest
import torch

from p2pd.codecs import Codec, CodecError, Coded, decode, decompress
from p2pd.decoding import decode as decode_stream
from p2pd.rpc import swarm_pb2 as pb
from p2pd.tensors import Limits, SnapshotKey, TensorStreamError, encode

KEY = SnapshotKey("model", 3, 1).to_pb()


def sample(shape=(37, 129), seed=0, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def wire(state, limits=Limits()):
    """Encode `state` (tensors and Coded values), decode the serialized parts: (decoded, encoded)."""
    enc = encode(state, KEY, chunk_bytes=1000)
    parts = [pb.SnapshotPart.FromString(p) for p in enc.parts]
    out, digest = decode_stream(parts, limits, expected_digest=enc.digest)
    assert digest == enc.digest
    return out, enc


@pytest.mark.parametrize("shape", [(37, 129), (4096,), (3, 5, 7, 11)])
def test_each_codec_round_trips_within_its_bound(shape):
    x = sample(shape)
    fp16 = decode(Codec("fp16").encode(x))
    assert fp16.dtype == torch.float32 and fp16.shape == x.shape
    assert ((fp16 - x).abs() <= x.abs() * 2**-11 + 1e-7).all()
    bf16 = decode(Codec("bf16").encode(x))
    assert ((bf16 - x).abs() <= x.abs() * 2**-8 + 1e-7).all()
    for block in (16, 64, 256):
        c = Codec("int8", block=block).encode(x)
        flat = x.reshape(-1)
        scales = torch.nn.functional.pad(flat.abs(), (0, (-len(flat)) % block)).view(-1, block).amax(1)
        bound = scales.repeat_interleave(block)[: len(flat)] / 254 + 1e-6
        assert ((decode(c).reshape(-1) - flat).abs() <= bound).all()
        assert c.nbytes == len(scales) * 4 + flat.numel()
    for ratio in (0.01, 0.1, 1.0):
        c = Codec("topk", ratio=ratio).encode(x)
        y = decode(c).reshape(-1)
        k = math.ceil(ratio * x.numel())
        kept = y != 0
        assert int(kept.sum()) == k  # kept values in fp16
        assert ((y[kept] - x.reshape(-1)[kept]).abs() <= x.reshape(-1)[kept].abs() * 2**-11).all()
        assert x.reshape(-1)[~kept].abs().max() <= x.reshape(-1)[kept].abs().min() if k < x.numel() else True
        assert c.nbytes == 6 * k


def test_fp16_clamps_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 1.0] * 400)
    assert torch.isfinite(decode(Codec("fp16").encode(x))).all()


def test_the_wire_carries_codecs_and_counts_their_bytes():
    """Bytes: fp16/bf16 half of float32, int8 a quarter plus scales, topk 6 bytes per value kept;
    small tensors, integers and norm statistics go raw; the receiver's decoded tensors are the
    sender's decode() bit for bit (what error feedback relies on)."""
    state = {
        "fc.weight": sample((256, 64)),
        "fc.bias": sample((128,)),
        "bn.running_var": sample((4096,)).abs(),
        "steps": torch.tensor(7),
    }
    raw = encode(state, KEY).total_bytes
    sizes = {}
    for codec in (Codec("fp16"), Codec("bf16"), Codec("int8"), Codec("topk", ratio=0.05)):
        coded = codec.compress(state)
        assert isinstance(coded["fc.weight"], Coded)
        assert not any(isinstance(coded[k], Coded) for k in ("fc.bias", "bn.running_var", "steps"))
        out, enc = wire(coded)
        sizes[codec.name] = enc.total_bytes
        expected = decompress(coded)
        assert set(out) == set(state)
        assert all(torch.equal(out[k], expected[k]) for k in state)
    small = raw - 256 * 64 * 4
    assert sizes["fp16"] == sizes["bf16"] == small + 256 * 64 * 2
    assert sizes["int8"] == small + 256 * 64 + 4 * 256 * 64 // 256
    assert sizes["topk"] == small + 6 * math.ceil(0.05 * 256 * 64)
    assert encode(state, KEY).hexdigest == encode(dict(state), KEY).hexdigest  # raw digests unchanged


def _bad(c: Coded, **change) -> dict:
    fields = dict(codec=c.codec, dtype=c.dtype, shape=c.shape, payload=c.payload.clone(), block=c.block, count=c.count)
    fields.update(change)
    return {"w": Coded(**fields)}


def test_corrupted_compressed_payloads_are_refused_with_a_reason():
    x = sample((64, 64))
    i8, tk = Codec("int8", block=64).encode(x), Codec("topk", ratio=0.1).encode(x)
    nan_scale = i8.payload.clone()
    nan_scale[:4] = torch.tensor([float("nan")]).view(torch.uint8)
    neg_scale = i8.payload.clone()
    neg_scale[:4] = torch.tensor([-1.0]).view(torch.uint8)
    out_of_range = tk.payload.clone()
    out_of_range[:4] = torch.tensor([64 * 64], dtype=torch.int32).view(torch.uint8)
    unordered = tk.payload.clone()
    unordered[:8] = torch.cat([unordered[4:8], unordered[:4]])
    inf_value = tk.payload.clone()
    inf_value[-2:] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8)
    cases = {
        "nan scale": (_bad(i8, payload=nan_scale), "bad_codec"),
        "negative scale": (_bad(i8, payload=neg_scale), "bad_codec"),
        "index out of range": (_bad(tk, payload=out_of_range), "bad_codec"),
        "indices out of order": (_bad(tk, payload=unordered), "bad_codec"),
        "more kept than exist": (_bad(tk, count=64 * 64 + 1), "bad_codec"),
        "block too small": (_bad(i8, block=4), "bad_codec"),
        "unknown codec": (_bad(i8, codec="zstd"), "unknown_codec"),
        "codec on integers": (_bad(i8, dtype="int64"), "bad_codec"),
        "inf after decoding": (_bad(tk, payload=inf_value), "non_finite"),
    }
    for what, (state, reason) in cases.items():
        with pytest.raises(TensorStreamError) as e:
            wire(state)
        assert e.value.reason == reason, what
    # values truncated: the payload shorter than its codec says
    short = _bad(tk, payload=tk.payload[:-2])
    with pytest.raises(CodecError, match="payload"):
        decode(short["w"])
    with pytest.raises(TensorStreamError) as e:  # its header announces fewer bytes than the codec needs
        wire(short)
    assert e.value.reason == "oversize"
    enc = encode({"w": tk}, KEY, chunk_bytes=100)  # the stream cut before the last values arrive
    parts = [pb.SnapshotPart.FromString(p) for p in enc.parts]
    with pytest.raises(TensorStreamError) as e:
        decode_stream(parts[:-2] + parts[-1:], expected_digest=enc.digest)
    assert e.value.reason == "truncated"
    with pytest.raises(TensorStreamError) as e:  # a receiver that accepts no codec
        wire({"w": i8}, Limits(codecs=frozenset()))
    assert e.value.reason == "unknown_codec"


def test_a_small_coded_shape_cannot_decode_into_a_huge_tensor():
    """topk sends 6 bytes per kept value whatever the shape: the decoded size has its own limit;
    an int8 block larger than its tensor (5 bytes that would hold a 4 MiB buffer) is refused."""
    huge = Coded("topk", "float32", (1 << 28,), torch.zeros(6, dtype=torch.uint8), count=1)
    with pytest.raises(TensorStreamError) as e:
        wire({"w": huge}, Limits(max_total_bytes=1 << 20))
    assert e.value.reason == "oversize"
    wide = Coded("int8", "float32", (1,), torch.zeros(5, dtype=torch.uint8), block=1 << 20)
    with pytest.raises(TensorStreamError) as e:
        wire({"w": wide})
    assert e.value.reason == "bad_codec"
    small = Codec("int8", block=4096).encode(sample((300,)))  # the encoder fits its block to the tensor
    assert small.block == 300 and decode(small).untyped_storage().nbytes() == 300 * 4


def test_codec_settings_are_checked():
    for bad in (dict(name="zip"), dict(name="topk", ratio=0), dict(name="int8", block=8)):
        with pytest.raises(ValueError):
            Codec(**bad)


def test_topk2bit_keeps_each_chunks_largest_on_four_levels_and_refuses_malformed_payloads():
    """SparseLoCo's compression: per chunk of 64 values its 4 largest in magnitude, each on one of the levels
    {-s, -s/3, s/3, s} of its chunk's scale s; 4 + 4 x 2 + 1 bytes a chunk (51x fewer than float32 here)."""
    x = sample((64, 64))
    c = Codec("topk2bit", ratio=4 / 64, block=64).encode(x)
    assert (c.block, c.count) == (64, 4) and c.nbytes == 64 * (4 + 8 + 1)
    y, rows = decode(c).reshape(64, 64), x.reshape(64, 64)
    top = rows.abs().topk(4, dim=1).indices
    assert torch.equal((y != 0).nonzero()[:, 1].view(64, 4), top.sort(dim=1).values)  # what is kept, and nothing else
    s = rows.gather(1, top).abs().amax(1, keepdim=True)
    levels = torch.cat([-s, -s / 3, s / 3, s], dim=1)
    kept = y.gather(1, top.sort(dim=1).values)
    assert torch.allclose((kept.unsqueeze(2) - levels.unsqueeze(1)).abs().amin(2), torch.zeros(64, 4), atol=1e-6)
    tail = Codec("topk2bit", ratio=0.5, block=64).encode(sample((70,)))  # a last chunk of 6 keeps 6, not 32
    assert int((decode(tail) != 0).sum()) <= 32 + 6 and tail.nbytes == 2 * 4 + 38 * 2 + math.ceil(38 / 4)
    offsets_at = 4 * 64
    out_of_chunk = c.payload.clone()
    out_of_chunk[offsets_at : offsets_at + 2] = torch.tensor([64], dtype=torch.int16).view(torch.uint8)
    repeated = c.payload.clone()
    repeated[offsets_at + 2 : offsets_at + 4] = repeated[offsets_at : offsets_at + 2]
    nan_scale = c.payload.clone()
    nan_scale[:4] = torch.tensor([float("nan")]).view(torch.uint8)
    for what, state in {
        "offset outside its chunk": _bad(c, payload=out_of_chunk),
        "offsets repeated": _bad(c, payload=repeated),
        "nan scale": _bad(c, payload=nan_scale),
        "chunk over 65536": _bad(c, block=1 << 17),
        "more kept than a chunk has": _bad(c, count=65),
    }.items():
        with pytest.raises(TensorStreamError) as e:
            wire(state)
        assert e.value.reason == "bad_codec", what

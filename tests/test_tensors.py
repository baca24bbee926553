import pytest
import torch

from p2pd.decoding import StreamDecoder, decode
from p2pd.rpc import swarm_pb2 as pb
from p2pd.tensors import (
    DTYPES,
    EncodedSnapshot,
    Limits,
    SnapshotKey,
    TensorStreamError,
    encode,
    iter_parts,
    pack,
)

KEY = SnapshotKey("model", 3, 1).to_pb()


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(33, 17, generator=g),
        "fc.bias": torch.randn(17, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(5),
        "emb": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "mask": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "q": torch.randint(-100, 100, (2, 2, 2), generator=g, dtype=torch.int8),
    }


def parts_of(sd, chunk=64):
    return list(iter_parts(pack(sd), KEY, chunk))


def decode_bytes(parts, limits=Limits(), expected_digest=None, expected_key=None):
    """The client's path: serialized parts through the zero-copy chunk reader."""
    dec = StreamDecoder(limits, expected_digest, expected_key=expected_key)
    for p in parts:
        dec.feed_bytes(p.SerializeToString())
    return dec.finish(), dec.digest


def reason(parts, **kw):
    """Refusal reason, checked to be the same on the parsed and the raw-bytes path."""
    got = []
    for fn in (decode, decode_bytes):
        with pytest.raises(TensorStreamError) as e:
            fn(parts, **kw)
        got.append(e.value.reason)
    assert got[0] == got[1], f"paths disagree: {got}"
    return got[0]


@pytest.mark.parametrize("via", [decode, decode_bytes])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_roundtrip_bit_identical_any_chunking(chunk, via):
    sd = sample()
    out, digest = via(parts_of(sd, chunk))
    assert digest == pack(sd).digest
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape
        assert torch.equal(
            out[k].view(-1).view(torch.uint8) if out[k].numel() else out[k],
            sd[k].reshape(-1).view(torch.uint8) if sd[k].numel() else sd[k],
        )


def test_every_whitelisted_dtype_roundtrips():
    sd = {name: torch.ones(3, dtype=dt) for name, dt in DTYPES.items()}
    out, _ = decode(parts_of(sd))
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_digest_is_content_only():
    sd = sample()
    assert pack(sd).digest == pack(dict(reversed(list(sd.items())))).digest
    changed = dict(sd, **{"fc.bias": sd["fc.bias"] + 1})
    assert pack(changed).digest != pack(sd).digest


def test_encode_matches_iter_parts():
    sd = sample()
    enc = encode(sd, KEY, 64)
    assert isinstance(enc, EncodedSnapshot)
    assert [p.SerializeToString() for p in parts_of(sd, 64)] == list(enc.parts)
    out, _ = decode(pb.SnapshotPart.FromString(p) for p in enc.parts)
    assert set(out) == set(sd)


def test_truncated_stream():
    parts = parts_of(sample())
    assert reason(parts[:-1]) == "truncated"  # no trailer
    assert reason(parts[: len(parts) // 2]) == "truncated"
    # drop a middle chunk of a multi-chunk tensor: the next tensor starts too early
    big = parts_of({"a": torch.randn(100), "b": torch.randn(3)}, chunk=64)
    assert reason(big[:2] + big[3:]) == "truncated"


def test_wrong_digest():
    parts = parts_of(sample())
    parts[-1] = pb.SnapshotPart(trailer=pb.StreamTrailer(digest=b"\x00" * 32))
    assert reason(parts) == "digest_mismatch"
    # a correct stream whose digest differs from the one the peer signed
    assert reason(parts_of(sample()), expected_digest=b"\x01" * 32) == "digest_mismatch"


def test_flipped_payload_bit_detected():
    parts = parts_of({"w": torch.zeros(64)})
    c = parts[1].chunk
    payload = bytearray(c.payload)
    payload[5] ^= 1
    c.payload = bytes(payload)
    assert reason(parts) == "digest_mismatch"


def test_oversize_limits():
    parts = parts_of({"w": torch.zeros(1000)})
    assert reason(parts, limits=Limits(max_total_bytes=3999)) == "oversize"
    assert reason(parts_of(sample()), limits=Limits(max_tensors=3)) == "oversize"
    # a chunk carrying more bytes than its tensor's shape allows
    parts = parts_of({"w": torch.zeros(4)})
    parts[1].chunk.payload = parts[1].chunk.payload + b"\x00" * 4
    assert reason(parts) == "oversize"


def test_lying_header_total():
    parts = parts_of({"w": torch.zeros(8)})
    parts[0].header.total_bytes = 16  # claims less than the tensor declares
    assert reason(parts) == "oversize"


def test_unknown_dtype_and_bad_shape():
    parts = parts_of({"w": torch.zeros(4)})
    parts[1].chunk.dtype = "complex64"
    assert reason(parts) == "unknown_dtype"
    parts = parts_of({"w": torch.zeros(4)})
    parts[1].chunk.dtype = "float64"  # a whitelisted dtype that the caller does not accept
    assert reason(parts, limits=Limits(dtypes=frozenset({"float32"}))) == "unknown_dtype"
    parts = parts_of({"w": torch.zeros(4)})
    del parts[1].chunk.shape[:]
    parts[1].chunk.shape.extend([1] * 9)
    assert reason(parts) == "bad_shape"
    parts = parts_of({"w": torch.zeros(4)})
    parts[1].chunk.shape[0] = -4
    assert reason(parts) == "bad_shape"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_refused(bad, dtype):
    w = torch.randn(50).to(dtype)
    w[17] = bad
    assert reason(parts_of({"w": w})) == "non_finite"
    out, _ = decode(parts_of({"w": w}), limits=Limits(allow_non_finite=True))
    assert out["w"].shape == (50,)


def test_structure_violations_are_malformed():
    parts = parts_of(sample())
    assert reason(parts[1:]) == "malformed"  # no header
    assert reason([parts[0], parts[0], *parts[1:]]) == "malformed"  # two headers
    assert reason([*parts, parts[1]]) == "malformed"  # data after trailer
    dup = parts_of({"a": torch.zeros(2), "b": torch.zeros(2)})
    dup[2].chunk.name = "a"
    assert reason(dup) == "malformed"
    bad_name = parts_of({"a": torch.zeros(2)})
    bad_name[1].chunk.name = "a\nb"
    assert reason(bad_name) == "malformed"
    assert reason([parts[0], pb.SnapshotPart()]) == "malformed"


def test_pack_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ValueError):
        pack({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError):
        pack({"bad name": torch.zeros(2)})


def test_snapshot_key_validation():
    assert SnapshotKey.from_pb(SnapshotKey("logits", 2, 5).to_pb()) == SnapshotKey("logits", 2, 5)
    with pytest.raises(ValueError):
        SnapshotKey("weights", 1)
    with pytest.raises(ValueError):
        SnapshotKey.from_pb(pb.SnapshotKey(kind=0))


def test_decoder_accounts_bytes():
    dec = StreamDecoder()
    for p in parts_of({"w": torch.zeros(100)}):
        dec.feed(p)
    dec.finish()
    assert dec.bytes_received == 400


def test_chunk_fast_path_agrees_with_protobuf_and_falls_back():
    from p2pd.decoding import _split_chunk

    c = pb.TensorChunk(name="w", dtype="float32", shape=[2, 3], offset=0, payload=bytes(range(24)))
    meta, payload = _split_chunk(pb.SnapshotPart(chunk=c).SerializeToString())
    assert bytes(payload) == c.payload and meta.name == "w" and list(meta.shape) == [2, 3]
    # payload written before the other fields, and an unknown field: still parsed the same
    inner = (
        pb.TensorChunk(payload=c.payload).SerializeToString()
        + pb.TensorChunk(name="w", dtype="float32", shape=[2, 3]).SerializeToString()
        + b"\x30\x07"
    )  # field 6 varint
    raw = b"\x12" + bytes([len(inner)]) + inner
    meta, payload = _split_chunk(raw)
    assert bytes(payload) == c.payload and meta.dtype == "float32"
    # not a chunk, truncated framing, junk: the fast path declines and protobuf decides
    assert _split_chunk(pb.SnapshotPart(header=pb.StreamHeader(tensor_count=1)).SerializeToString()) is None
    assert _split_chunk(pb.SnapshotPart(chunk=c).SerializeToString()[:-3]) is None
    dec = StreamDecoder()
    with pytest.raises(TensorStreamError) as e:
        dec.feed_bytes(b"\xff\xff\xff")
    assert e.value.reason == "malformed"


def test_decode_into_reuses_matching_buffers_only():
    sd = sample()
    into = {"fc.weight": torch.zeros(33, 17), "fc.bias": torch.zeros(3, dtype=torch.float16)}  # bias: wrong shape
    target = into["fc.weight"]
    out, _ = decode(parts_of(sd), into=into)
    assert out["fc.weight"].data_ptr() == target.data_ptr()
    assert torch.equal(target, sd["fc.weight"])
    assert out["fc.bias"].data_ptr() != into["fc.bias"].data_ptr() and torch.equal(out["fc.bias"], sd["fc.bias"])


def test_stream_for_another_key_is_refused():
    parts = parts_of({"w": torch.zeros(4)})  # announces KEY (model, round 3, step 1)
    assert reason(parts, expected_key=SnapshotKey("model", 4, 1).to_pb()) == "wrong_key"
    out, _ = decode(parts, expected_key=KEY)
    assert "w" in out


def test_absurd_zero_size_shape_is_bad_shape():
    parts = parts_of({"w": torch.zeros(0, 2)})
    del parts[1].chunk.shape[:]
    parts[1].chunk.shape.extend([0, 2**62, 2**62])
    assert reason(parts) == "bad_shape"
    parts = parts_of({"w": torch.zeros(0, 2)})
    del parts[1].chunk.shape[:]
    parts[1].chunk.shape.extend([0] + [2**31 - 1] * 7)
    assert reason(parts) == "bad_shape"


def test_decode_into_tied_buffers_keeps_tensors_distinct():
    shared = torch.zeros(4)
    sd = {"a": torch.ones(4), "b": torch.full((4,), 2.0)}
    out, _ = decode(parts_of(sd), into={"a": shared, "b": shared})
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])

"""Signed peer records: what a node tells the swarm about itself, and how others check it.

Wire format (what is stored in the DHT, and what other tools read): UTF-8 JSON

    {"body": "<PeerRecord as compact JSON>", "sig": "<base64 Ed25519 signature>"}

The signature covers ``DOMAIN + body`` (the exact body string, so nothing is re-serialised
before checking). The signer's public key is embedded in ``peer_id`` (see identity.py), so
a record is self-certifying: whoever holds the key behind the id wrote it, and nobody else
can. ``open_record`` checks, in order: envelope, signature, schema, binding to the DHT row
it was found in, issue time, expiry. Each failure raises ``RecordRefused`` with a short
``reason`` that callers count in metrics.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2pd import __version__
from p2pd.addresses import is_host_port
from p2pd.errors import ReasonedError
from p2pd.identity import Identity, IdentityError, public_key_from_peer_id, verify

DOMAIN = b"atoll/peer-record/v1\x00"
# The record format's version. Within a version, fields are only ever added, and readers ignore
# fields they do not know (the signature still covers the whole body), so nodes of different
# releases read each other's records during a rolling upgrade. A change that old readers would
# misread bumps the version; a reader refuses records of a newer version (reason newer_version).
RECORD_VERSION = 1
MAX_RECORD_BYTES = 8192
MAX_TTL_SECONDS = 3600.0
# hivemind assumes peers' clocks agree within a few seconds; allow a little more
CLOCK_SKEW_SECONDS = 5.0

Role = Literal["trainer", "aggregator", "expert", "router", "observer"]
# How neighbours reach a node's snapshots (node/net/netcheck.py finds it, node/net/grpc_exchange.py routes by it):
# direct: gRPC at grpc_address; relayed: libp2p streams to peer_id (p2pd/libp2p.py: an open
# connection, hole punching or a circuit relay); outbound_only: through its `carrier`, a reachable
# neighbour it pushes its snapshots to (the Push RPC)
Reachability = Literal["direct", "relayed", "outbound_only"]
MAX_SNAPSHOTS = 32
_SNAPSHOT_ENTRY = r"^(model|logits|delta|estimate|ranks|shard|join):[0-9]{1,19}:[0-9]{1,10}:[0-9a-f]{64}$"
_DEVICE = re.compile(r"^(cpu|mps|cuda(:[0-9]{1,2})?)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RecordRefused(ReasonedError, ValueError):
    """A record that must not be used. `reason` is a short metric label."""


def swarm_key(swarm: str) -> str:
    """The DHT key under which every member of `swarm` stores its record (subkey = peer id)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", swarm):
        raise ValueError(f"swarm name must match [a-z0-9][a-z0-9_-]{{0,62}}, got {swarm!r}")
    return f"atoll/{swarm}/peers"


MAX_DIRECTORY_BITS = 12  # at most 4,096 directory buckets


def directory_key(swarm: str, bits: int, bucket: int) -> str:
    """The DHT key of bucket `bucket` of `swarm`'s directory split into 2**bits buckets (subkey = peer id). With
    bits = 0 it is swarm_key(swarm): the one key every member stores its record under. Raises ValueError for a bad
    swarm name or a bucket or bits out of range. The bits are part of the key: a swarm's nodes must agree on them."""
    if not 0 <= bits <= MAX_DIRECTORY_BITS or not 0 <= bucket < 1 << bits:
        raise ValueError(f"need 0 <= bits <= {MAX_DIRECTORY_BITS} and 0 <= bucket < 2**bits, got {bits}, {bucket}")
    key = swarm_key(swarm)
    return key if bits == 0 else f"atoll/{swarm}/dir{bits}/{bucket}"


def bucket_of(peer_id: str, bits: int) -> int:
    """The directory bucket of `peer_id` among 2**bits: the first 4 bytes of its BLAKE2b digest, modulo 2**bits."""
    return int.from_bytes(hashlib.blake2b(peer_id.encode(), digest_size=4).digest(), "big") % (1 << bits)


class PeerRecord(BaseModel):
    """One node's self-description. Immutable; build a new one to change a field. Unknown
    fields (from a newer release of the same record version) are ignored, see RECORD_VERSION."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    record_version: Annotated[int, Field(ge=1, lt=2**16)] = RECORD_VERSION
    peer_id: str
    grpc_address: str
    dht_maddrs: Annotated[tuple[Annotated[str, Field(max_length=256)], ...], Field(max_length=8)] = ()
    device: str = "cpu"
    samples_per_second: Annotated[float, Field(ge=0.0)] = 0.0
    utilization: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # compute / wall time since its first round
    dataset_size: Annotated[int, Field(ge=0, lt=2**63)] = 0
    round: Annotated[int, Field(ge=0, lt=2**63)] = 0
    step: Annotated[int, Field(ge=0, lt=2**32)] = 0  # gossip step within the round
    model_digest: str = ""  # hex BLAKE3 of the snapshot published as (round, step), "" if none
    # every snapshot the node serves, "kind:round:step:hexdigest": a fetched snapshot must
    # match the digest its producer signed here, or it is refused as unsigned
    snapshots: Annotated[
        tuple[Annotated[str, Field(pattern=_SNAPSHOT_ENTRY)], ...], Field(max_length=MAX_SNAPSHOTS)
    ] = ()
    proxy_digest: str = ""  # logit exchange: hex digest of the node's proxy set, "" if it exchanges models
    task_digest: str = ""  # node/task: hex digest of the task's name and the shapes of the tensors that travel
    # the codec of the node's snapshots (p2pd/codecs.py; "none": raw), with "+ef" when it sends
    # compressed differences with error feedback (CHOCO-SGD); a name this release does not know
    # is kept, so a receiver can say which codec it cannot decode
    codec: Annotated[str, Field(pattern=r"^[a-z0-9+]{0,16}$")] = "none"
    roles: Annotated[tuple[Role, ...], Field(max_length=5)] = ("trainer",)
    reachability: Reachability = "direct"  # older records carry none: they were dialled directly
    carrier: str = ""  # outbound_only: the peer id that serves this node's snapshots, "" if none yet
    # diffusion experts (node/algo/experts/): the cluster an expert models (-1: not an expert) and the
    # digest of the clustering it belongs to; model_digest is then its checkpoint's sha256
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0  # Prometheus endpoint on the gRPC host, 0: none
    cluster: Annotated[int, Field(ge=-1, lt=2**16)] = -1
    cluster_digest: str = ""
    software_version: Annotated[str, Field(max_length=32)] = __version__
    issued_at: float
    expires_at: float

    @field_validator("peer_id")
    @classmethod
    def _peer_id(cls, v: str) -> str:
        try:
            public_key_from_peer_id(v)
        except IdentityError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("carrier")
    @classmethod
    def _carrier(cls, v: str) -> str:
        if v:
            try:
                public_key_from_peer_id(v)
            except IdentityError as e:
                raise ValueError(f"carrier: {e}") from None
        return v

    @field_validator("grpc_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not is_host_port(v):
            raise ValueError(f"grpc_address must be host:port, got {v!r}")
        return v

    @field_validator("dht_maddrs")
    @classmethod
    def _maddrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for addr in v:
            if not addr.startswith("/") or any(c.isspace() for c in addr):
                raise ValueError(f"not a multiaddr: {addr!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"device must be cpu, mps or cuda[:N], got {v!r}")
        return v

    @field_validator("model_digest", "proxy_digest", "cluster_digest", "task_digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if v and not _HEX64.fullmatch(v):
            raise ValueError("digests must be 64 lowercase hex characters or empty")
        return v

    @field_validator("samples_per_second", "issued_at", "expires_at")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    def snapshot_digest(self, kind: str, round: int, step: int) -> bytes | None:
        """The digest this record signs for snapshot (kind, round, step), or None."""
        prefix = f"{kind}:{round}:{step}:"
        for entry in self.snapshots:
            if entry.startswith(prefix):
                return bytes.fromhex(entry[len(prefix) :])
        return None

    @model_validator(mode="after")
    def _times(self) -> PeerRecord:
        ttl = self.expires_at - self.issued_at
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"expires_at - issued_at must be in (0, {MAX_TTL_SECONDS:.0f}] s, got {ttl:.1f}")
        return self


def sign_record(record: PeerRecord, identity: Identity) -> bytes:
    """Serialise and sign `record` with the key it names; returns the envelope bytes."""
    if record.peer_id != identity.peer_id:
        raise ValueError("a node can only sign its own record")
    # version 1 bodies carry no version field: releases from before versioning refuse unknown fields
    body = record.model_dump_json(exclude={"record_version"} if record.record_version == 1 else None)
    sig = identity.sign(DOMAIN + body.encode())
    envelope = json.dumps({"body": body, "sig": base64.b64encode(sig).decode()}, separators=(",", ":"))
    return envelope.encode()


def open_record(data: bytes, *, now: float | None, expected_peer_id: str | None = None) -> PeerRecord:
    """Check an envelope and return its record, or raise RecordRefused(reason).

    `now` is the DHT time to check issue and expiry times against; None skips those checks.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise RecordRefused("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRefused("oversize", f"{len(data)} bytes > {MAX_RECORD_BYTES}")
    try:
        envelope = json.loads(data)
        body, sig_b64 = envelope["body"], envelope["sig"]
        if set(envelope) != {"body", "sig"} or not isinstance(body, str) or not isinstance(sig_b64, str):
            raise ValueError("unexpected envelope fields")
        sig = base64.b64decode(sig_b64, validate=True)
        claimed = json.loads(body)["peer_id"]
        if not isinstance(claimed, str):
            raise ValueError("peer_id is not a string")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as e:
        raise RecordRefused("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not verify(claimed, DOMAIN + body.encode(), sig):
        raise RecordRefused("bad_signature", f"record claiming {claimed[:16]}...")
    try:
        record = PeerRecord.model_validate_json(body)
    except ValidationError as e:
        raise RecordRefused("schema", str(e).replace("\n", " ")[:300]) from None
    if record.record_version > RECORD_VERSION:
        raise RecordRefused(
            "newer_version",
            f"record version {record.record_version} > {RECORD_VERSION}: "
            f"upgrade atoll to read {record.peer_id[:16]}...",
        )
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise RecordRefused("peer_id_mismatch", f"row {expected_peer_id[:16]}... holds {record.peer_id[:16]}...")
    if now is None:
        return record
    if record.issued_at > now + CLOCK_SKEW_SECONDS:
        raise RecordRefused("not_yet_valid", f"issued {record.issued_at - now:.1f} s in the future")
    if record.expires_at <= now:
        raise RecordRefused("expired", f"expired {now - record.expires_at:.1f} s ago")
    return record

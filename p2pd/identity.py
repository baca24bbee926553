"""A node's identity: one persisted Ed25519 key, its libp2p peer id, sign and verify.

The key file is a libp2p ``crypto.pb.PrivateKey`` protobuf (key type Ed25519, data = 32-byte
seed followed by the 32-byte public key), which is exactly what the go-libp2p-daemon reads
with ``-id``. atoll hands the same file to ``hivemind.DHT(identity_path=...)``, so the DHT
daemon runs with the node's own identity and the DHT peer id *is* the atoll peer id: no
second key to bind. (hivemind itself only generates RSA identities and its
"identity already taken" probe parses RSA only, so atoll creates the file itself and starts
the DHT with ``check_if_identity_free=False``.)

The peer id is the libp2p one for Ed25519 keys: the base58 identity multihash of the
protobuf-encoded public key (``12D3KooW...``). Since the public key is inside the id,
anyone can verify a signature from the peer id alone.

Why not py-libp2p's key types: py-libp2p and hivemind both register the protobuf symbol
``crypto.pb.KeyType`` in the default descriptor pool, so they cannot be imported in one
process. The ids computed here are cross-checked against py-libp2p's ``ID.from_pubkey`` in
tests/test_identity.py (in a subprocess).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import crypto_pb2

_ED25519 = crypto_pb2.KeyType.Ed25519
_IDENTITY_MULTIHASH = 0x00
# protobuf PublicKey{Type: Ed25519, Data: <32 bytes>} is always these 4 bytes + the key
_PUBKEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])


class IdentityError(ValueError):
    """A key file or peer id that cannot be used; the message says why."""


def peer_id_from_public_key(public_key: bytes) -> str:
    """libp2p peer id (base58) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise IdentityError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    encoded = _PUBKEY_PREFIX + public_key
    return base58.b58encode(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded).decode()


@functools.lru_cache(maxsize=4096)  # a node checks the same few peers' signatures every round
def _public_key(peer_id: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the raw Ed25519 public key embedded in an Ed25519 libp2p peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as e:
        raise IdentityError(f"peer id is not base58: {peer_id!r}") from e
    if len(raw) != 2 + len(_PUBKEY_PREFIX) + 32 or raw[0] != _IDENTITY_MULTIHASH or raw[1] != len(raw) - 2:
        raise IdentityError(f"not an Ed25519 libp2p peer id: {peer_id!r}")
    if raw[2:6] != _PUBKEY_PREFIX:
        raise IdentityError(f"not an Ed25519 libp2p peer id: {peer_id!r}")
    return raw[6:]


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True if `signature` over `message` was made by the key behind `peer_id`."""
    try:
        _public_key(peer_id).verify(signature, message)
        return True
    except (IdentityError, InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair with its libp2p peer id. Load or create with `load_or_create`."""

    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @functools.cached_property
    def peer_id(self) -> str:
        """The libp2p peer id of this key (base58, `12D3KooW...`), computed once."""
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random key pair, not persisted (`path` is None)."""
        return cls(Ed25519PrivateKey.generate())

    def to_libp2p_bytes(self) -> bytes:
        """The key as a libp2p PrivateKey protobuf (the format p2pd reads)."""
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return crypto_pb2.PrivateKey(key_type=_ED25519, data=seed + self.public_key).SerializeToString()

    @classmethod
    def from_libp2p_bytes(cls, data: bytes, path: Path | None = None) -> Identity:
        """Parse a libp2p Ed25519 PrivateKey protobuf (`path` is kept and named in errors); raises IdentityError for
        another key type, bad length or a public key that does not match."""
        where = f" in {path}" if path else ""
        try:
            pb = crypto_pb2.PrivateKey.FromString(data)
        except Exception as e:  # protobuf raises DecodeError or RuntimeError for junk
            raise IdentityError(
                f"key file{where} is not a key atoll can read (expected a libp2p Ed25519 private key, "
                f"as atoll writes it); give another path and atoll creates a new key there, "
                f"e.g. atoll identity show --key NEW.key"
            ) from e
        if pb.key_type != _ED25519:
            raise IdentityError(
                f"key file{where} holds a {crypto_pb2.KeyType.Name(pb.key_type)} key; atoll needs Ed25519"
            )
        if len(pb.data) != 64:
            raise IdentityError(f"key file{where}: Ed25519 key data must be 64 bytes, got {len(pb.data)}")
        key = Ed25519PrivateKey.from_private_bytes(pb.data[:32])
        identity = cls(key, path)
        if identity.public_key != pb.data[32:]:
            raise IdentityError(f"key file{where}: stored public key does not match the private key")
        return identity

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Load the key at `path`, or create it (mode 0600, parent dirs included) if missing."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise IdentityError(
                f"key file {path} is a directory: give the path of a file, e.g. {path / 'node.key'} "
                f"(created on first start)"
            )
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise IdentityError(f"key file {path} is readable by other users; run: chmod 600 {path}")
            return cls.from_libp2p_bytes(path.read_bytes(), path)
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls(Ed25519PrivateKey.generate(), path)
        # O_EXCL: two nodes racing on one path must not end up with different keys silently
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_libp2p_bytes())
            f.flush()
            os.fsync(f.fileno())
        return identity

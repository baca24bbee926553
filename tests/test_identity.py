import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from p2pd.identity import Identity, IdentityError, peer_id_from_public_key, public_key_from_peer_id, verify


def test_created_once_with_mode_0600_and_reloaded(keydir):
    path = keydir / "sub" / "node.key"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = Identity.load_or_create(path)
    assert a.peer_id == b.peer_id
    assert a.peer_id.startswith("12D3KooW")


def test_sign_verify_and_tamper():
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.peer_id, b"hello", sig)
    assert not verify(ident.peer_id, b"hellO", sig)
    assert not verify(Identity.generate().peer_id, b"hello", sig)
    assert not verify("not-a-peer-id", b"hello", sig)


def test_peer_id_roundtrip():
    ident = Identity.generate()
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    assert peer_id_from_public_key(ident.public_key) == ident.peer_id
    with pytest.raises(IdentityError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-style id


def test_bad_key_files_give_clear_errors(keydir):
    junk = keydir / "junk.key"
    junk.write_bytes(b"\x00garbage")
    os.chmod(junk, 0o600)
    with pytest.raises(IdentityError, match="not a libp2p private key|Ed25519|64 bytes"):
        Identity.load_or_create(junk)
    open_perms = keydir / "open.key"
    open_perms.write_bytes(Identity.generate().to_libp2p_bytes())
    os.chmod(open_perms, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(open_perms)


def test_peer_id_matches_py_libp2p(keydir):
    """Our peer id must equal py-libp2p's for the same key. py-libp2p cannot be imported next
    to hivemind (duplicate protobuf symbols), so it runs in a subprocess."""
    if importlib.util.find_spec("libp2p") is None:  # importing it here would clash with hivemind
        pytest.skip("libp2p (dev extra) provides the reference implementation")
    ident = Identity.load_or_create(keydir / "x.key")
    seed = (keydir / "x.key").read_bytes()
    code = (
        "import sys, json\n"
        "from libp2p.crypto.ed25519 import Ed25519PrivateKey\n"
        "from libp2p.peer.id import ID\n"
        "from libp2p.crypto.serialization import deserialize_private_key\n"
        "data = bytes.fromhex(sys.argv[1])\n"
        "from libp2p.crypto.pb import crypto_pb2\n"
        "pb = crypto_pb2.PrivateKey.FromString(data)\n"
        "key = Ed25519PrivateKey.from_bytes(pb.data[:32])\n"
        "print(json.dumps({'id': ID.from_pubkey(key.get_public_key()).to_base58(),\n"
        "                  'sig_ok': key.get_public_key().verify(b'm', bytes.fromhex(sys.argv[2]))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, seed.hex(), ident.sign(b"m").hex()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    assert ref["id"] == ident.peer_id
    assert ref["sig_ok"] is True

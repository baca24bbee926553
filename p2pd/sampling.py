"""Peer sampling and probes on the wire: what a Health call carries for them, and how each side checks it.

A node running a sampled membership (node/net/sampler.py, Basalt: node/algo/comm/sampling.py) exchanges its view in
Health calls: a *pull* asks for the callee's view (`want_view`), a *push* sends the caller's (`view`). Entries are a
peer id and the gRPC address the sender last reached it at: untrusted hints, each checked by a *probe* before the peer
is used. A probe is a Health call with a random nonce; the reply carries the callee's signed record and an Ed25519
signature over ``probe_message(nonce, requester, responder)``, so an old reply cannot stand in for a node that is gone
and a reply relayed from elsewhere names the wrong requester.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable, Iterable
from typing import Protocol

import base58

from p2pd.addresses import is_host_port
from p2pd.identity import Identity, IdentityError, public_key_from_peer_id, verify
from p2pd.rpc import swarm_pb2 as pb

DOMAIN = b"atoll/probe/v1\x00"
MAX_VIEW_ENTRIES = 256  # entries read from one pushed or pulled view; the rest are dropped unread
NONCE_BYTES = 16


class Sampling(Protocol):
    """What a node's gRPC server asks of its peer sampler (node/net/sampler.py implements it)."""

    def view(self) -> list[tuple[str, str]]:
        """This node's view: (peer id, gRPC address) pairs."""

    def pushed(self, entries: list[tuple[str, str]]) -> None:
        """A caller pushed `entries` (already checked by `entries_of`)."""


def probe_message(nonce: bytes, requester: str, responder: str) -> bytes:
    """The bytes a probe reply signs: DOMAIN, the nonce, then the requester's and responder's peer ids."""
    return DOMAIN + nonce + b"|" + requester.encode() + b"|" + responder.encode()


def new_nonce() -> bytes:
    """A fresh random probe nonce (NONCE_BYTES bytes)."""
    return os.urandom(NONCE_BYTES)


def sign_probe(identity: Identity, nonce: bytes, requester: str) -> bytes:
    """The responder's signature over a probe (raises ValueError for a nonce outside 16..64 bytes)."""
    if not 16 <= len(nonce) <= 64:
        raise ValueError(f"a probe nonce is 16 to 64 bytes, got {len(nonce)}")
    return identity.sign(probe_message(nonce, requester, identity.peer_id))


def probe_ok(signature: bytes, nonce: bytes, requester: str, responder: str) -> bool:
    """Whether `signature` is `responder`'s over the probe (nonce, requester)."""
    try:
        return verify(responder, probe_message(nonce, requester, responder), signature)
    except IdentityError:
        return False


def valid_entry(peer_id: str, address: str) -> bool:
    """Whether (peer id, address) is well formed: an Ed25519 peer id and a host:port address."""
    if not is_host_port(address) or len(peer_id) > 128:
        return False
    try:
        public_key_from_peer_id(peer_id)
    except IdentityError:
        return False
    return True


def entries_of(view: Iterable[pb.PeerEntry]) -> list[tuple[str, str]]:
    """The well-formed, distinct entries of a received view, the first MAX_VIEW_ENTRIES read (the rest ignored)."""
    out, seen = [], set()
    for i, e in enumerate(view):
        if i >= MAX_VIEW_ENTRIES:
            break
        if not 0 < len(e.peer) <= 96 or e.peer in seen:
            continue
        seen.add(e.peer)
        try:
            peer_id = base58.b58encode(e.peer).decode()
        except (ValueError, binascii.Error):
            continue
        if valid_entry(peer_id, e.address):
            out.append((peer_id, e.address))
    return out


def to_pb(entries: Iterable[tuple[str, str]]) -> list[pb.PeerEntry]:
    """(peer id, address) pairs as PeerEntry messages (raises ValueError for a peer id that is not base58)."""
    return [pb.PeerEntry(peer=base58.b58decode(p), address=a) for p, a in entries]


def exchange_views(sampling: Sampling, request: pb.HealthRequest) -> pb.HealthReply:
    """A server's answer to a peer-sampling call: the pushed view handed to `sampling`, and its own view if asked (no
    record, no keys: see HealthReply)."""
    if request.view:
        sampling.pushed(entries_of(request.view))
    reply = pb.HealthReply()
    if request.want_view:
        reply.view.extend(to_pb(sampling.view()))
    return reply


def answer_probe(sign: Callable[[bytes, str], bytes], request: pb.HealthRequest, reply: pb.HealthReply) -> None:
    """Sign a probe's nonce into `reply` with `sign(nonce, requester)` when `request` carries one of 16 to 64 bytes."""
    if request.nonce and 16 <= len(request.nonce) <= 64:
        reply.probe_signature = sign(request.nonce, request.requester_peer_id[:128])

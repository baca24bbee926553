"""Every reason atoll refuses or skips something for, in one place: the `reason` label of its metrics.

A reason is a short, low-cardinality word that operators count and alert on, so the whole
vocabulary is listed here, by the metric that counts it, with what it means. docs/security.md's
table of reasons is checked against this module by tests/test_reasons.py, and so is every
reason the code raises or counts.
"""

from __future__ import annotations

# -- a received tensor stream (p2pd/decoding.py; TensorStreamError.reason) ----------------------------------------
STREAM = {
    "malformed": "parts out of order, inconsistent sizes, a bad tensor name, or undecodable bytes",
    "wrong_key": "not the snapshot that was asked for",
    "truncated": "the stream ended early",
    "oversize": "over the byte or tensor-count limit",
    "unknown_dtype": "a dtype the receiver does not accept",
    "bad_shape": "a shape over the rank or dimension limits",
    "digest_mismatch": "the content does not match the trailer or the digest its producer signed",
    "non_finite": "NaN or Inf in a floating tensor, after decoding",
    "unknown_codec": "a codec the receiver does not accept",
    "bad_codec": "codec fields that do not add up (scales, indices, sizes)",
}

# -- a peer record (p2pd/records.py; RecordRefused.reason; atoll_records_refused_total) -------------------------
RECORD = {
    "malformed": "not a signed envelope",
    "oversize": "larger than a record may be",
    "bad_signature": "not signed by the key inside the peer id it claims",
    "schema": "fields of the wrong type or out of range",
    "peer_id_mismatch": "the DHT row's subkey names another peer",
    "not_yet_valid": "issued in the future (a clock ahead)",
    "expired": "past its signed expiry",
    "newer_version": "written by a newer release of the record format",
    "invalid_row": "refused by the DHT validator on its way in (counted inside the DHT process)",
    "bad_probe": "a probe answered without the probed peer's signature over its nonce (sampled membership)",
    "bucket_unread": "a directory bucket whose DHT read failed: its members are missing from that read",
}

# -- a request to this node's server (atoll_requests_refused_total) ---------------------------------------------
REQUEST = {
    "unsigned": "a fetch request without a valid signature of a live member",
    "stale": "a request signed more than 30 s ago (or ahead)",
    "unknown": "a requester with no live record in the swarm",
    "rate": "over the requester's token bucket (security.fetch_rate)",
    "bad_request": "undecodable bytes, no deadline, or a key or part that makes no sense",
    "not_found": "a snapshot this node does not hold (any more)",
    "busy": "every fetch slot or dial-back is taken",
    "busy_identity": "over the streams one requester may hold at once",
    "stalled": "a reader that stopped reading, cancelled",
    "unsupported": "a call this node does not serve (it carries no snapshots, it does not dial back)",
    "not_carrier": "a push whose record does not name this node as the carrier",
}

# -- a router's sample request, over gRPC or HTTP (node/net/experts/sampling.py; SampleRefused.reason;
# atoll_router_requests_total{status} counts them by the transport's status) --------------------------------------
SAMPLE = {
    "invalid": "a count, strategy or step count outside the router's bounds (gRPC INVALID_ARGUMENT, HTTP 400)",
    "rate": "over the client address's token bucket (experts.sample_rate; gRPC RESOURCE_EXHAUSTED, HTTP 429)",
    "busy": "experts.max_pending requests already waiting (gRPC RESOURCE_EXHAUSTED, HTTP 503)",
    "unavailable": "no live expert could serve the run, or the router is stopping (gRPC UNAVAILABLE, HTTP 503)",
}

# -- a neighbour's snapshot this node could not use (atoll_fetch_failures_total) -----------------------------------
FETCH = {
    "timeout": "not had before comm.fetch_timeout",
    "unavailable": "nothing answered at its address",
    "busy": "it had no fetch slot free",
    "refused": "it refused the call (another gRPC status)",
    "not_found": "it no longer holds the snapshot",
    "rate_limited": "over our token bucket at its server",
    "denied": "its server does not know this node (yet)",
    "behind": "it has not reached that round and step",
    "evicted": "it moved past the snapshot and dropped it",
    "unsigned": "served, but its record does not sign the snapshot's digest",
    "proxy_mismatch": "logits about another proxy set",
    "no_carrier": "an outbound-only peer without a live carrier",
    "no_libp2p": "a relayed peer, and this node has no libp2p plane",
    "backed_off": "skipped without waiting: it did not answer in recent rounds",
    "incompatible": "tensors that do not fit this model",
    "not_a_permutation": "an FRL ranking that is not a permutation",
    "logits_shape": "logits of the wrong shape",
    "logits_schema": "logits of another class count or proxy set",
    "merge_canonical_gone": "the final merge's canonical member left before its copy was fetched",
    "merge_mismatch": "the canonical member's merge differs from ours beyond rounding",
    "push_too_large": "a snapshot too large to push to a carrier",
    **{f"record_{r}": f"its record: {what}" for r, what in RECORD.items()},
    **STREAM,
}

# -- a neighbour's update the aggregator set aside (atoll_updates_discarded_total) ---------------------------------
DISCARDED = {
    "not_selected": "not among multi-Krum's choices",
    "clipped": "shortened to the neighbourhood's update norm (ClippedGossip, or a suspect under any aggregator)",
    "down_weighted": "weighted towards zero by SybilWall",
    "rejected": "refused by Bristle's per-class check",
}

# fetch failures worth retrying within the same deadline: the neighbour may answer a moment later
RETRYABLE = ("timeout", "unavailable", "busy", "not_found", "rate_limited", "denied")
# a carrier (or any peer) that answers it is full: wait for it, do not replace it
FULL = ("busy", "rate_limited")
assert set(RETRYABLE) <= set(FETCH) and set(FULL) <= set(RETRYABLE)

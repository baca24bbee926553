import base64
import json

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from p2pd.dht import PeerRecordValidator
from p2pd.identity import Identity
from p2pd.records import DOMAIN, PeerRecord, RecordRefused, open_record, sign_record, swarm_key

NOW = 1_800_000_000.0


def make(ident, **kw):
    fields = dict(peer_id=ident.peer_id, grpc_address="127.0.0.1:5000", issued_at=NOW, expires_at=NOW + 30)
    fields.update(kw)
    return PeerRecord(**fields)


def reason_of(data, **kw):
    with pytest.raises(RecordRefused) as e:
        open_record(data, **kw)
    return e.value.reason


def test_roundtrip():
    ident = Identity.generate()
    rec = make(ident, round=7, model_digest="ab" * 32, roles=("trainer", "aggregator"), device="cuda:1")
    assert open_record(sign_record(rec, ident), now=NOW + 1, expected_peer_id=ident.peer_id) == rec


def test_forged_signature_refused():
    victim, attacker = Identity.generate(), Identity.generate()
    env = json.loads(sign_record(make(attacker), attacker))
    body = json.loads(env["body"])
    body["peer_id"] = victim.peer_id  # claim the victim's id, sign with our own key
    env["body"] = json.dumps(body)
    assert reason_of(json.dumps(env).encode(), now=NOW) == "bad_signature"


def test_tampered_body_refused():
    ident = Identity.generate()
    env = json.loads(sign_record(make(ident), ident))
    env["body"] = env["body"].replace("127.0.0.1:5000", "127.0.0.1:6666")
    assert reason_of(json.dumps(env).encode(), now=NOW) == "bad_signature"


def test_record_in_another_peers_row_refused():
    a, b = Identity.generate(), Identity.generate()
    assert reason_of(sign_record(make(a), a), now=NOW, expected_peer_id=b.peer_id) == "peer_id_mismatch"


def test_expired_and_future_records_refused():
    ident = Identity.generate()
    data = sign_record(make(ident), ident)
    assert reason_of(data, now=NOW + 31) == "expired"
    assert reason_of(data, now=NOW - 60) == "not_yet_valid"


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"body": 1, "sig": "x"}', b'{"body": "{}", "sig": "!!"}', b"x" * 10000],
)
def test_malformed_envelopes_refused(data):
    assert reason_of(data, now=NOW) in {"malformed", "oversize"}


def _signed(ident, **changes) -> bytes:
    """An envelope whose body is a valid record with `changes` applied, signed by its owner."""
    body = json.loads(make(ident).model_dump_json())
    body.update(changes)
    body_s = json.dumps(body)
    return json.dumps(
        {"body": body_s, "sig": base64.b64encode(ident.sign(DOMAIN + body_s.encode())).decode()}
    ).encode()


def test_schema_violations_signed_by_owner_refused():
    """A correctly signed body that breaks the schema is still refused."""
    ident = Identity.generate()
    for bad in (
        {"samples_per_second": -1.0},
        {"grpc_address": "nohost"},
        {"expires_at": NOW + 10**6},
        {"round": "7"},
        {"record_version": 0},
    ):
        assert reason_of(_signed(ident, **bad), now=NOW) == "schema", bad


def test_a_newer_release_adding_fields_is_read_and_a_newer_format_refused():
    """Rolling upgrades: a field added by a newer release of the same record version is ignored
    (the signature still covers it); a newer record version is refused with its own reason."""
    ident = Identity.generate()
    rec = open_record(_signed(ident, uplink_mbps=40, future={"nested": [1, 2]}), now=NOW)
    assert rec.peer_id == ident.peer_id and not hasattr(rec, "uplink_mbps")
    assert reason_of(_signed(ident, record_version=2), now=NOW) == "newer_version"
    tampered = json.loads(_signed(ident, future=1))
    tampered["body"] = tampered["body"].replace('"future": 1', '"future": 2')
    assert reason_of(json.dumps(tampered).encode(), now=NOW) == "bad_signature"
    # version 1 bodies have no version field, so releases from before versioning still read them
    assert "record_version" not in json.loads(json.loads(sign_record(make(ident), ident))["body"])


def test_swarm_key_validation():
    assert swarm_key("demo-1") == "atoll/demo-1/peers"
    with pytest.raises(ValueError):
        swarm_key("../etc")


def test_dht_validator_accepts_only_owner_signed_rows():
    ident, other = Identity.generate(), Identity.generate()
    v = PeerRecordValidator("demo")
    key = DHTID.generate(source=swarm_key("demo")).to_bytes()
    rec = make(ident)
    value = MSGPackSerializer.dumps(sign_record(rec, ident))
    sub = MSGPackSerializer.dumps(ident.peer_id)
    assert v.validate(DHTRecord(key, sub, value, rec.expires_at))
    # a row under someone else's subkey, a longer DHT expiry than signed, junk: all refused
    assert not v.validate(DHTRecord(key, MSGPackSerializer.dumps(other.peer_id), value, rec.expires_at))
    assert not v.validate(DHTRecord(key, sub, value, rec.expires_at + 3600))
    assert not v.validate(DHTRecord(key, sub, MSGPackSerializer.dumps(b"junk"), rec.expires_at))
    assert not v.validate(DHTRecord(key, sub, b"\xc1", rec.expires_at))
    # other keys are not ours to judge
    assert v.validate(DHTRecord(DHTID.generate(source="other").to_bytes(), sub, b"\xc1", rec.expires_at))


def test_live_peers_drops_and_counts_bad_rows_by_reason(keydir):
    """Second line of defence: rows a foreign DHT node returned are opened again by the reader.
    (The DHT is a stand-in here; the real-DHT version is in test_discovery.py.)"""
    from types import SimpleNamespace

    from hivemind.utils import get_dht_time

    from p2pd.discovery import Discovery

    me, peer, other, old = (Identity.load_or_create(keydir / f"{n}.key") for n in ("me", "peer", "other", "old"))
    now = get_dht_time()

    def signed(ident, **kw):
        return sign_record(
            make(ident, issued_at=kw.get("issued_at", now), expires_at=kw.get("expires_at", now + 30)), ident
        )

    rows = {
        peer.peer_id: signed(peer),
        me.peer_id: signed(me),
        other.peer_id: signed(peer),  # peer's record in other's row
        old.peer_id: signed(old, issued_at=now - 100, expires_at=now - 10),
        "junk": b"{not json",
        7: signed(other),
    }
    found = SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in rows.items()})
    d = Discovery(me, swarm="demo")
    d._dht = SimpleNamespace(get=lambda key, latest, return_future: SimpleNamespace(result=lambda timeout: found))
    assert [p.peer_id for p in d.live_peers()] == sorted([me.peer_id, peer.peer_id])
    assert [p.peer_id for p in d.live_peers(include_self=False)] == [peer.peer_id]
    assert d.refused == {"peer_id_mismatch": 2, "expired": 2, "malformed": 4}
    d._dht = None


def test_replayed_older_record_cannot_outlive_the_signed_expiry():
    """hivemind keeps the row with the later expiry: a replay stored with even 1 s more than
    its signed expiry would replace a newer record, so the validator allows none."""
    ident = Identity.generate()
    v = PeerRecordValidator("demo")
    key = DHTID.generate(source=swarm_key("demo")).to_bytes()
    rec = make(ident)
    value = MSGPackSerializer.dumps(sign_record(rec, ident))
    sub = MSGPackSerializer.dumps(ident.peer_id)
    assert not v.validate(DHTRecord(key, sub, value, rec.expires_at + 1.0))
    assert v.validate(DHTRecord(key, sub, value, rec.expires_at))


def test_hostile_json_is_malformed_not_a_crash():
    assert reason_of(b"[" * 5000, now=NOW) == "malformed"
    assert reason_of(b'{"body": "' + b"[" * 3000 + b'", "sig": ""}', now=NOW) == "malformed"


def test_round_is_bounded_like_snapshot_keys():
    ident = Identity.generate()
    with pytest.raises(ValueError):  # pydantic's ValidationError
        make(ident, round=2**63)

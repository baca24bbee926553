"""The hivemind DHT underneath membership: starting its process with a bounded wait, the record validator that
runs inside every atoll DHT node, and the errors a start can end in (an unreachable bootstrap, a skewed clock).

``PeerRecordValidator`` runs on stores a DHT node receives and on values it fetches: a row whose signature is bad,
whose signer is not the row's subkey, or whose DHT expiry outlives the signed one is never stored nor returned. One
such row no longer hides a whole answer (``_validate_rows_one_by_one``).
"""

from __future__ import annotations

import multiprocessing
import os
import re
from typing import Any

import hivemind
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from p2pd.procs import start_hivemind_process
from p2pd.records import RecordRefused, directory_key, open_record


def clock_skew(error: str) -> str | None:
    """hivemind's "local time must be within 3 seconds of others (local: T1, peer: T2)" as one line with the offset
    and what to do; None for any other error."""
    m = re.search(r"local time must be within ([\d.]+) seconds.*?local: ([\d.]+), peer: ([\d.]+)", error, re.S)
    if m is None:
        return None
    limit, offset = float(m.group(1)), float(m.group(2)) - float(m.group(3))
    return (
        f"clock skew: this machine's clock is {abs(offset):.1f} s {'ahead of' if offset > 0 else 'behind'} the "
        f"initial peer's (the DHT needs them within {limit:g} s): synchronise the clock (NTP: timedatectl "
        f"set-ntp true, or chrony) on whichever machine is wrong, then start again"
    )


class DiscoveryError(RuntimeError):
    """The DHT could not be started or joined; the message says what to check."""


def start_dht(*, ready_timeout: float = 60.0, **dht_kwargs: Any) -> hivemind.DHT:
    """A started hivemind DHT process, waited for with a bound (see start_hivemind_process).

    The p2pd daemon it spawns inherits this process's environment: unless the user set GOGC,
    its Go collector runs at GOGC=50 (p2pd resident 70 instead of 85 MB on the demo, same speed;
    a GOMEMLIMIT low enough to matter made the demo 2x slower)."""
    os.environ.setdefault("GOGC", "50")
    try:
        return start_hivemind_process(lambda: hivemind.DHT(start=False, **dht_kwargs), ready_timeout=ready_timeout)
    except TimeoutError as e:
        raise DiscoveryError(str(e)) from e


class PeerRecordValidator(RecordValidatorBase):
    """hivemind record validator for the swarm key; other keys pass through untouched.

    `dropped` counts the rows it refused, in memory shared with the DHT child process where
    it runs (created before the fork), so the node can export the count."""

    def __init__(self, swarm: str, directory_bits: int = 0):
        """`swarm`: the swarm name whose directory keys it checks (rows under other keys pass); `directory_bits`: the
        directory's split (p2pd.records.directory_key; 0: the one swarm key). Raises ValueError for a name
        directory_key refuses or bits out of range."""
        self._key_ids = {
            DHTID.generate(source=directory_key(swarm, directory_bits, b)).to_bytes()
            for b in range(1 << directory_bits)
        }
        self.dropped = multiprocessing.Value("Q", 0)

    def validate(self, record: DHTRecord) -> bool:
        """True for rows under other keys; for a directory row, whether its signed record opens with the subkey as
        signer and its DHT expiry is at most the signed one (refusals counted in `dropped`)."""
        if record.key not in self._key_ids:
            return True
        ok = self._valid_row(record)
        if not ok:
            with self.dropped.get_lock():
                self.dropped.value += 1
        return ok

    def _valid_row(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            if not isinstance(subkey, str) or not isinstance(value, bytes):
                return False
            # Expiry is deliberately not checked here: hivemind drops expired rows itself, and
            # a rejection here would discard a whole multi-peer answer over one stale row.
            rec = open_record(value, now=None, expected_peer_id=subkey)
        except (RecordRefused, ValueError, TypeError):
            return False
        except Exception:  # msgpack raises its own exception types for junk
            return False
        # Exactly the signed expiry or less: any slack would let a replayed older record outlive
        # (and so replace, since hivemind keeps the later expiry) the current one.
        return record.expiration_time <= rec.expires_at


def _validate_rows_one_by_one(self, key_bytes: bytes, dictionary) -> bool:
    """Replaces hivemind's DHTProtocol._validate_dictionary, which refuses a peer's whole
    dictionary answer when one row fails: one garbage row held by a DHT node that does not run
    atoll's validator (a stock bootstrap) would then hide every member it holds. Here invalid
    rows are dropped (and counted by the validator) and the valid ones kept."""
    if self.record_validator is None:
        return True
    with dictionary.freeze():
        bad = [
            subkey
            for subkey, (value, expiration) in dictionary.items()
            if not self.record_validator.validate(
                DHTRecord(key_bytes, self.serializer.dumps(subkey), value, expiration)
            )
        ]
    for subkey in bad:
        del dictionary[subkey]
    return True


DHTProtocol._validate_dictionary = _validate_rows_one_by_one  # hivemind <1.2, see pyproject

"""`atoll status`, `atoll prometheus-targets`, `atoll version`: read a real DHT that holds one member's signed
record (and one garbage row), and refuse bad input in one line."""

import importlib.metadata
import json

import pytest
from helpers import assert_one_line_error, cli
from hivemind.utils import get_dht_time

from p2pd.dht import start_dht
from p2pd.identity import Identity
from p2pd.records import PeerRecord, sign_record, swarm_key


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    """A DHT holding one live member's record in swarm `cli`, plus a garbage row; its multiaddr."""
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], ready_timeout=30)
    try:
        member = Identity.load_or_create(tmp_path_factory.mktemp("keys") / "m.key")
        now = get_dht_time()
        rec = PeerRecord(
            peer_id=member.peer_id, grpc_address="127.0.0.1:7", metrics_port=9, issued_at=now, expires_at=now + 120
        )
        assert dht.store(swarm_key("cli"), sign_record(rec, member), rec.expires_at, subkey=member.peer_id)
        dht.store(swarm_key("cli"), b"\x00garbage", now + 120, subkey="garbage")
        yield str(dht.get_visible_maddrs()[0]), member.peer_id
    finally:
        dht.shutdown()
        dht.join(10)


def test_status_and_prometheus_targets_read_the_live_record(bootstrap, tmp_path):
    maddr, peer_id = bootstrap
    r = cli("status", "--peers", maddr, "--swarm", "cli", "--json", "--wait", "0.5")
    assert r.exit_code == 0, r.stderr
    assert [rec["peer_id"] for rec in json.loads(r.stdout)] == [peer_id]  # the garbage row is not a member
    r = cli("status", "--peers", maddr, "--swarm", "cli", "--wait", "0.5")
    assert (
        r.exit_code == 0 and "1 live node(s) in swarm 'cli'" in r.stdout and peer_id[-8:] in r.stdout
    )  # narrow: its last 8
    empty = cli("status", "--peers", maddr, "--swarm", "nobody-here", "--wait", "0")
    assert empty.exit_code == 0 and "0 live node(s)" in empty.stdout
    out = tmp_path / "targets.json"
    r = cli("prometheus-targets", "--peers", maddr, "--swarm", "cli", "--out", str(out), "--wait", "0.5")
    assert r.exit_code == 0, r.stderr
    (group,) = json.loads(out.read_text())
    assert group["targets"] == ["127.0.0.1:9"]
    assert_one_line_error(
        cli("prometheus-targets", "--peers", maddr, "--swarm", "cli", "--out", str(out / "t.json")),
        "cannot write",  # its folder is a file
    )


@pytest.mark.parametrize("command", ["status", "prometheus-targets"])
def test_a_bad_multiaddr_is_one_clear_line(command, tmp_path):
    args = ["--out", str(tmp_path / "t.json")] if command == "prometheus-targets" else []
    assert_one_line_error(cli(command, "--peers", "garbage", "--wait", "0", *args), "garbage", "multiaddr")


def test_version_is_the_installed_package_version():
    r = cli("version")
    assert r.exit_code == 0 and r.stdout.strip() == importlib.metadata.version("atoll")

"""The namespace NAT of tests/netns.py really is a NAT: out through the router, nothing in."""

import subprocess
import sys
import time

import psutil
import pytest
from netns import nat_topology, netns_list, unavailable

PY = sys.executable

# accepts one connection (10 s at most), prints the peer's address
LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(10)
print("ready", flush=True)
c, peer = s.accept(); print(peer[0], flush=True)
"""

# connects within 3 s; exits 0 on success, else 1 with the error
DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
except OSError as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


@pytest.fixture(scope="module")
def topo():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with nat_topology("t") as t:
        yield t


def listen(topo, host, port):
    """A listener in ``host`` on its address; returns once it accepts connections."""
    proc = topo.popen(host, [PY, "-c", LISTEN, topo.hosts[host], str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def gone(proc):
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def dial(topo, host, ip, port):
    return topo.run(host, [PY, "-c", DIAL, ip, str(port)], timeout=10)


def test_private_host_dials_out_and_is_seen_as_the_router(topo):
    lst = listen(topo, "pub1", 7001)
    r = dial(topo, "priv", topo.hosts["pub1"], 7001)
    assert r.returncode == 0, r.stderr
    assert lst.communicate(timeout=10)[0].strip() == topo.router_public_ip == "198.18.0.1"


def test_public_host_cannot_dial_the_private_host(topo):
    lst = listen(topo, "priv", 7002)
    t0 = time.monotonic()
    r = dial(topo, "pub1", topo.hosts["priv"], 7002)
    assert r.returncode != 0
    assert "unreachable" in r.stderr.lower(), r.stderr  # no route: refused at once, not a timeout
    assert time.monotonic() - t0 < 3
    lst.kill()
    lst.communicate(timeout=10)


def test_public_hosts_reach_each_other_directly(topo):
    lst = listen(topo, "pub2", 7003)
    r = dial(topo, "pub1", topo.hosts["pub2"], 7003)
    assert r.returncode == 0, r.stderr
    assert lst.communicate(timeout=10)[0].strip() == topo.hosts["pub1"]


def test_exit_kills_everything_and_deletes_the_namespaces():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # a child in a session of its own, as a p2pd daemon may be: only the namespace sweep finds it
    spawn = "import subprocess, time; print(subprocess.Popen(['sleep', '60'], start_new_session=True).pid, flush=True)"
    spawn += "; time.sleep(60)"
    with nat_topology("e") as t:
        names = [t.ns(h) for h in ("router", "pub1", "pub2", "priv")]
        assert set(names) <= set(netns_list())
        parent = t.popen("priv", [PY, "-c", spawn], stdout=subprocess.PIPE, text=True)
        orphan = psutil.Process(int(parent.stdout.readline()))
        sleeper = t.popen("pub1", ["sleep", "60"])
        # 127.0.0.1 works inside a namespace (lo is up)
        assert t.run("pub2", [PY, "-c", DIAL, "127.0.0.1", "1"]).stderr.startswith("ConnectionRefusedError")
    assert parent.returncode is not None and sleeper.returncode is not None
    deadline = time.monotonic() + 5  # killed by the sweep, then reaped by init
    while not gone(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(orphan)
    assert not set(names) & set(netns_list())

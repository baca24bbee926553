"""Starting and stopping real node processes for integration tests."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from p2pd.procs import kill_tree  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


class NodeProcess:
    """tests/peer_node.py (or any command printing JSON-line events) in its own process."""

    def __init__(self, *args: str, command: list[str] | None = None, stderr_path: Path | None = None):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            (command or [sys.executable, str(ROOT / "tests" / "peer_node.py")]) + list(args),
            stdout=subprocess.PIPE,
            stderr=open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            start_new_session=True,  # kill_tree can then find its orphans by process group
        )
        self.pid = self.proc.pid
        self.events: queue.Queue = queue.Queue()
        self.info: dict | None = None
        self.last_peers: list[str] = []
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def wait_event(self, kind: str, timeout: float, predicate=lambda e: True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node {self.pid} exited with {self.proc.returncode}") from None
                continue
            self.seen.append(e)
            if e.get("event") == "peers":
                self.last_peers = e["peers"]
            if e.get("event") == kind and predicate(e):
                return e
        raise TimeoutError(f"node {self.pid}: no {kind!r} event within {timeout} s")

    def ready(self, timeout: float = 60.0) -> dict:
        self.info = self.wait_event("ready", timeout)
        return self.info

    def stop(self, timeout: float = 20.0) -> int | None:
        """Clean leave (SIGTERM); anything left is killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(self.pid, signal.SIGKILL)
        return self.proc.returncode

    def kill(self) -> None:
        """Crash: SIGKILL the node and its DHT/p2pd descendants at once."""
        kill_tree(self.pid, signal.SIGKILL)
        self.proc.wait(10)


ATOLL_NODE = [sys.executable, "-m", "node.app.cli", "node", "start", "--json-events"]


def atoll_node(config: Path, *extra: str, log: Path | None = None) -> NodeProcess:
    """A real `atoll node start` daemon."""
    return NodeProcess("--config", str(config), *extra, command=ATOLL_NODE, stderr_path=log)


class Terminal:
    """A command as a user runs it in a terminal of its own: its own session, human output
    collected line by line, Ctrl-C as SIGINT to its process group."""

    def __init__(self, argv: list[str], log: Path, cwd: Path = ROOT, env: dict | None = None):
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env or dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=open(log, "wb"),
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching `pattern` (re.search), waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.3)  # the reader thread may still hold the last lines
                if not any(re.search(pattern, x) for x in self.lines):
                    raise RuntimeError(f"exited with {self.proc.returncode}: {''.join(self.lines)[-1500:]}")
            time.sleep(0.2)
        raise TimeoutError(f"no line matching {pattern!r} within {timeout} s: {''.join(self.lines)[-1500:]}")

    def ctrl_c(self, timeout: float = 15.0) -> int | None:
        """SIGINT to its group, as a terminal's Ctrl-C; its exit code (anything left is killed)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        kill_tree(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed EC certificate for 127.0.0.1, valid for a day, that
    is its own CA (clients pass the cert as the CA file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atoll-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def cli(*args: str):
    """Run `atoll ARGS` in this process (Typer's runner: no interpreter start-up); the result has exit_code, stdout
    and stderr. For the commands' arguments and their errors; commands that start daemons run as processes."""
    from typer.testing import CliRunner

    from node.app.cli.app import app

    return CliRunner().invoke(app, [*args])


def assert_one_line_error(result, *words: str, after_progress: bool = False) -> None:
    """A user's mistake: exit status 2 and one line on stderr, naming each of `words`, with no traceback (with
    `after_progress`, progress lines may come before it: the error is the last line)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stdout[-500:], result.stderr[-500:])
    assert lines and (len(lines) == 1 or after_progress), result.stderr
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[-1] for w in words), (words, lines[-1])

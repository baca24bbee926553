"""deploy/prometheus/alerts.yml: valid rules (promtool check), rules that fire when they should
(promtool test rules), and every metric they name is one a node really exports."""

import re
import subprocess
from pathlib import Path

import torch
import yaml
from prometheus_client import generate_latest
from sysdeps import needs

from node.algo.security.trust import TrustTracker
from node.net.metrics import NodeMetrics

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
needs_promtool = needs("prometheus")


def scrape_with_attacker() -> bytes:
    """A node's metrics after it watched a sign flipper and a pair of sybils for three rounds."""
    gen = torch.Generator().manual_seed(0)
    tracker = TrustTracker()
    ref = torch.zeros(50)
    for _ in range(3):
        honest = {f"h{i}": ref + 0.1 * torch.randn(50, generator=gen) + 0.3 for i in range(4)}
        sybil = ref + 0.1 * torch.randn(50, generator=gen) - 0.2
        others = {**honest, "flipper": ref - 4 * (honest["h0"] - ref), "s1": sybil, "s2": sybil + 1e-4}
        tracker.observe(ref, ref + 0.3, others)
    m = NodeMetrics()
    m.watch(lambda: 123, lambda: {"bad_signature": 2}, lambda: {"rate": 5, "unknown": 1})
    m.watch_trust(lambda: (dict(tracker.signals), tracker.sybil_clusters()), top_n=4)
    m.updates_discarded.labels(reason="trimmed").inc(3)
    m.fetch_failures.labels(reason="digest_mismatch").inc()
    m.accuracy.set(0.9)
    return generate_latest(m.registry)


def test_scrape_shows_attackers_with_bounded_labels():
    text = scrape_with_attacker().decode()
    flagged = set(re.findall(r'^atoll_peer_flagged\{peer="([^"]+)"\} 1\.0$', text, re.M))
    assert flagged == {"flipper", "s1", "s2"}
    assert re.search(r'^atoll_peer_sybil_suspected\{peer="s1"\} 1\.0$', text, re.M)
    assert re.search(r"^atoll_sybil_cluster_size 2\.0$", text, re.M)
    assert re.search(r"^atoll_peers_flagged 3\.0$", text, re.M)  # counts every neighbour, not just the top 4
    peers = set(re.findall(r'^atoll_peer_trust_ratio\{peer="([^"]+)"\}', text, re.M))
    assert len(peers) == 4 and {"flipper", "s1", "s2"} <= peers  # top_n least trusted only
    assert 'atoll_requests_refused_total{reason="rate"} 5.0' in text


def test_every_metric_in_the_alert_rules_is_exported():
    text = scrape_with_attacker().decode()
    names = set(re.findall(r"^([a-z_]+)[{ ]", text, re.M))  # sample names, as PromQL sees them
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    used = {
        name for g in rules["groups"] for rule in g["rules"] for name in re.findall(r"\batoll_[a-z_]+", rule["expr"])
    }
    assert used and used <= names, used - names


@needs_promtool
def test_promtool_checks_rules_and_runs_their_unit_tests():
    r = subprocess.run(
        ["promtool", "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_trust_metrics_pass_promtool_check_metrics():
    r = subprocess.run(["promtool", "check", "metrics"], input=scrape_with_attacker(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

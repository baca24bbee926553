"""Every file under deploy/ parses, names real commands, configs and metrics, and passes
promtool where Prometheus files are concerned."""

import configparser
import json
import re
import subprocess
from pathlib import Path

import yaml
from sysdeps import needs

from node.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_metric_names() -> set[str]:
    """Every series a trainer (under attack), a router and an expert export after real work."""
    from test_alert_rules import scrape_with_attacker
    from test_router_http import router_scrape

    return set(re.findall(r"^([a-z_]+)[{ ]", (scrape_with_attacker() + router_scrape()).decode(), re.M))


def test_dockerfile_has_cpu_default_and_cuda_build_arg():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # CPU torch unless told otherwise
    assert re.search(r'^ENTRYPOINT \["atoll-entrypoint"\]$', text, re.M) and "VOLUME /data" in text
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / src).exists(), src
    r = subprocess.run(["sh", "-n", str(DEPLOY / "entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compose_runs_three_nodes_and_prometheus_with_valid_configs():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = [s for s in services.values() if s.get("command", [None])[:2] == ["node", "start"]]
    assert len(nodes) >= 3 and "prometheus" in services and "targets" in services
    indexes = set()
    for s in nodes:
        cmd = s["command"]
        sets = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")
        indexes.add(int(sets["node_index"]))
        cfg = load_config(DEPLOY / "compose" / "node.yaml", {"node_index": int(sets["node_index"])})
        assert cfg.node_count == len(nodes)
    assert indexes == set(range(len(nodes)))
    assert any("prometheus.yml" in v for v in services["prometheus"]["volumes"])


def test_kubernetes_manifests(tmp_path):
    docs = {}
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            docs[d["kind"]] = d
    assert set(docs) == {"ConfigMap", "Service", "StatefulSet"}
    svc, sts, cm = docs["Service"], docs["StatefulSet"], docs["ConfigMap"]
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = sts["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/data" in mounts and "/etc/atoll" in mounts  # identity + checkpoints persist; config from the ConfigMap
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (tmp_path / "node.yaml").write_text(cm["data"]["node.yaml"])
    cfg = load_config(tmp_path / "node.yaml", {"node_index": sts["spec"]["replicas"] - 1})
    assert cfg.node_count == sts["spec"]["replicas"] and cfg.train.local_seconds  # work as a time budget
    assert re.fullmatch(
        r"/dns4/atoll-0\.atoll\.[a-z0-9-]+\.svc\.cluster\.local/tcp/7001/p2p/12D3KooW\w+",
        cm["data"]["ATOLL_INITIAL_PEERS"],
    )


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "atoll-node.service")
    exec_start = unit["Service"]["ExecStart"].split()
    assert exec_start[1:3] == ["node", "start"] and unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"


def test_grafana_dashboard_queries_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "atoll-dashboard.json").read_text())
    names = exported_metric_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\batoll_[a-z_]+", e)}
    assert len(exprs) >= 12 and used <= names, used - names
    router_row = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert router_row == ["Router and diffusion experts"]
    assert {"atoll_router_requests_total", "atoll_router_samples_total", "atoll_router_experts_live"} <= used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


@needs("prometheus")
def test_prometheus_config_passes_promtool():
    r = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr

"""Prometheus file-based service discovery from the swarm's DHT records.

`atoll prometheus-targets` writes the file_sd JSON Prometheus reads (`file_sd_configs`): one
target group per live node that exposes metrics, `host:metrics_port` with the host of its
advertised gRPC address, labelled with its peer id, roles and device. The file is replaced
atomically, so Prometheus never reads half of it; run with `--every` to follow the swarm as
nodes join and leave. The scraped node's peer id is the target label `node`, not `peer`:
per-neighbour metrics carry their own `peer` label (the neighbour), which a target label of
the same name would rename to `exported_peer` and break every rule grouped by peer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from p2pd.records import PeerRecord


def targets(records: list[PeerRecord], swarm: str) -> list[dict]:
    """file_sd target groups, sorted by peer id, one per record with a metrics port: `host:metrics_port` (the host of
    its gRPC address) labelled with node (peer id), swarm, roles and device."""
    groups = []
    for r in sorted(records, key=lambda r: r.peer_id):
        if not r.metrics_port:
            continue
        host = r.grpc_address.rsplit(":", 1)[0]  # "[::1]" stays bracketed, as a target needs
        groups.append(
            {
                "targets": [f"{host}:{r.metrics_port}"],
                "labels": {"node": r.peer_id, "swarm": swarm, "roles": ",".join(r.roles), "device": r.device},
            }
        )
    return groups


def write_atomic(path: Path, groups: list[dict]) -> None:
    """Write `groups` as JSON to `path` (creating parent directories) through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(groups, indent=1) + "\n")
    os.replace(tmp, path)

"""Benchmarks behind `atoll bench ...`: each writes results.json, table.md and a plot."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, payload: dict, table_md: str) -> list[Path]:
    """results.json and table.md in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.md").write_text(table_md + "\n")
    return [out / "results.json", out / "table.md"]

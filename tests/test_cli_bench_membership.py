"""`atoll bench membership`: a tiny end-to-end run (wire sizes measured on a real gRPC server, the simulator, the
tables and plot) and clean errors for bad input."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def atoll(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "node.app.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_bench_membership_tiny(tmp_path):
    r = atoll(
        "bench", "membership", "--sizes", "60", "--rounds", "6", "--attack-nodes", "60", "--attackers", "0.25",
        "--floods", "10", "--attack-rounds", "6", "--calibration-rows", "", "--out", str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "membership.png").stat().st_size > 0
    assert "Attackers' share" in (tmp_path / "table.md").read_text()
    costs = res["costs"]
    assert costs["pull"] > 60 * 40 and costs["probe"] > 500  # measured on a real gRPC server: 60 entries, a record
    row = res["scale"][0]
    assert row["honest"] == 60 and costs["pull"] + costs["push"] <= row["bytes_p50"] <= row["bytes_max"]
    assert [a["hierarchical"] for a in res["attack"]] == [False, True]
    assert all(0 < a["view_share"] < 1 and abs(a["identity_share"] - 0.25) < 0.02 for a in res["attack"])
    assert len(res["churn"]) == 2 and res["calibration"] == []


@pytest.mark.parametrize(
    "args",
    [
        ["--sizes", "5"],
        ["--attackers", "0.95"],
        ["--floods", "many"],
        ["--view", "2"],
        ["--calibration-rows", "0"],
    ],
)
def test_bad_input_is_one_clear_line(args):
    r = atoll("bench", "membership", *args, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip(), r.stderr[-500:]

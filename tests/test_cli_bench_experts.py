"""`atoll bench experts`: bad options are one line before anything trains, and a tiny run of the 28x28 setting
(conv U-Nets on Fashion-MNIST, clusters on the judge's features) writes the table, the grids and the results."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, assert_one_line_error, cli
from sysdeps import needs


@pytest.mark.parametrize(
    "args, words",
    [
        (["--net", "transformer"], ["--net", "transformer"]),
        (["--cluster-on", "colour"], ["--cluster-on", "colour"]),
        (["--net", "unet"], ["--net unet", "fashion-mnist"]),  # 8x8 digits are too small for the U-Net
        (["--net", "unet", "--dataset", "fashion-mnist", "--width", "12"], ["multiple of 8"]),
        (["--dataset", "cifar"], ["--dataset", "cifar"]),
        (["--seeds", "a"], ["--seeds"]),
    ],
)
def test_bad_bench_experts_options_are_one_clear_line(args, words):
    assert_one_line_error(cli("bench", "experts", *args), *words)


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
@needs("dataset-fashion-mnist")
def test_a_tiny_28x28_run_writes_the_table_grids_and_results(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "node.app.cli", "bench", "experts", "--dataset", "fashion-mnist", "--net", "unet",
         "--width", "8", "--batch-size", "16", "--cluster-on", "features", "--judge-steps", "20", "--steps", "3",
         "--router-steps", "3", "--samples", "40", "--sample-steps", "2", "--seeds", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [s["method"] for s in res["summary"]] == ["monolith", "top1", "top2", "full", "real (train images)"]
    assert res["meta"]["net"] == "unet" and res["meta"]["cluster_on"] == "features"
    mix = res["seeds"][0]["class_mix"]
    assert len(mix) == 4 and sum(map(sum, mix)) == 60000  # every training image is in one cluster
    for method in ("monolith", "top1", "top2", "full"):
        assert (tmp_path / f"grid_{method}.png").read_bytes().startswith(b"\x89PNG")
    assert "| top2 |" in (tmp_path / "table.md").read_text()

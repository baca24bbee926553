"""`atoll bench wan` and `atoll bench predict`: bad input is one line before anything is built, and predict
writes a table whose times come from the link model (the testbed itself: tests/test_testbed.py)."""

import json

import pytest
from helpers import assert_one_line_error, cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["wan", "--profile", "dialup"], ["--profile", "home3"]),
        (["wan", "--methods", "gossip,carrier_pigeon"], ["--methods", "carrier_pigeon"]),
        (["wan", "--systems", "atoll,spark"], ["--systems", "spark"]),
        (["wan", "--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
        (["predict", "--profile", "dialup"], ["--profile"]),
        (["predict", "--nodes", "1"], ["--nodes"]),
        (["predict", "--config", "examples/kjv4.yaml"], ["image tasks"]),
    ],
)
def test_bad_input_is_one_clear_line(args, words):
    assert_one_line_error(cli("bench", *args), *words)


def test_a_swarm_the_data_cannot_be_split_for_is_one_clear_line_after_the_progress():
    """Found running it: digits cannot give 64 nodes 10 samples each under Dirichlet 0.5; that was a traceback."""
    r = cli("bench", "predict", "--nodes", "64", "--set", "train.rounds=1", "--step-seconds", "0.01")
    assert_one_line_error(r, "could not give", after_progress=True)


def test_predict_times_a_swarm_on_the_profile_links(tmp_path):
    args = ["--nodes", "4,8", "--set", "train.rounds=3", "--set", "train.local_steps=20", "--step-seconds", "0.01"]
    r = cli("bench", "predict", *args, "--profile", "mixed7", "--target", "0.2", "--out", str(tmp_path))
    assert r.exit_code == 0, r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["nodes"] for row in rows] == [4, 8]
    for row in rows:  # 3 rounds of 20 steps at 10 ms: 0.6 s of compute, plus transfers on 5-100 Mbit/s links
        assert row["wall_max_s"] >= row["wall_median_s"] > 0.6 and 0 < row["utilization"] < 1
        assert row["mb_per_node"] > 0 and row["to_target_s"] is not None
    assert "| 8 |" in r.stdout and (tmp_path / "table.md").is_file()


def test_every_method_the_benchmark_runs_can_be_named():
    from node.app.bench.wan_report import atoll_methods
    from node.app.cli.bench_wan import METHODS

    assert METHODS == tuple(atoll_methods(rounds=4))


def test_each_run_starts_in_an_empty_folder(tmp_path):
    """Found running it: a second `bench wan` into the same --out resumed the nodes from the checkpoints the
    first (interrupted) run left, and measured two rounds instead of four."""
    from node.app.bench import fresh_dir

    stale = tmp_path / "runs" / "r0-atoll-diloco" / "node0" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    run = fresh_dir(tmp_path / "runs" / "r0-atoll-diloco")
    assert run.is_dir() and list(run.iterdir()) == []

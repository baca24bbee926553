"""The link model (node/algo/comm/links.py): transfers take bytes / rate, share links max-min fairly, wait for
their source to publish, and all-reduces wait for their group; the same traces always give the same times."""

import numpy as np
import pytest

from node.algo.comm.links import AllReduce, Compute, Fetch, Idle, Linger, Publish, max_min_rates, replay

MB = 1e6
K = ("model", 0, 0)


def test_one_transfer_takes_bytes_over_the_tighter_link():
    traces = {"a": [Publish(K)], "b": [Fetch((("a", K, 10 * MB),))]}
    spent = replay(traces, {"a": 1 * MB, "b": 9 * MB}, {"a": 9 * MB, "b": 2 * MB}, {"a": 0.1, "b": 0.1})
    assert spent["b"].comm == pytest.approx(10.0) and spent["b"].end == pytest.approx(10.0)
    assert spent["a"].end == 0.0 and spent["b"].utilization == 0.0


def test_two_fetchers_share_an_uplink_and_a_slow_source_leaves_the_downlink_to_a_fast_one():
    traces = {"a": [Publish(K)], "b": [Fetch((("a", K, 10 * MB),))], "c": [Fetch((("a", K, 10 * MB),))]}
    rates = {"a": 1 * MB, "b": 9 * MB, "c": 9 * MB}
    spent = replay(traces, rates, rates, {p: 0.0 for p in rates})
    assert spent["b"].end == pytest.approx(20.0) and spent["c"].end == pytest.approx(20.0)
    # b downloads from a slow a (1 MB/s up) and a fast c (10 MB/s up) through a 5 MB/s downlink: 1 + 4
    r = max_min_rates(np.array([0, 2]), np.array([1, 1]), np.array([1, 9, 10]) * MB, np.array([9, 5, 9]) * MB)
    assert r == pytest.approx([1 * MB, 4 * MB])


def test_a_fetch_waits_for_the_publish_and_time_splits_into_compute_comm_and_idle():
    traces = {
        "a": [Compute(5), Publish(K), Fetch((("b", K, 2 * MB),)), Idle()],
        "b": [Compute(1), Publish(K), Fetch((("a", K, 4 * MB),)), Idle()],
    }
    rates = {"a": 1 * MB, "b": 1 * MB}
    spent = replay(traces, rates, rates, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5})
    # b: computes 1 s, waits for a until 5 s, then 4 s of transfer: comm 8 s, ends at 9.5 s
    assert spent["b"].compute == 1.0 and spent["b"].comm == pytest.approx(8.0) and spent["b"].idle == 0.5
    assert spent["b"].end == pytest.approx(9.5)
    # a: computes 5 s; b's snapshot is there since 1 s: 2 s of transfer
    assert spent["a"].comm == pytest.approx(2.0) and spent["a"].end == pytest.approx(7.5)
    assert spent["a"].utilization == pytest.approx(5 / 7.5)
    again = replay(traces, rates, rates, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5})
    assert again == spent  # no clock: the same traces give the same times


def test_an_all_reduce_waits_for_its_group_and_moves_two_model_sizes_through_the_slowest_link():
    group = ("a", "b", "c", "d")
    traces = {p: [Compute(i + 1), AllReduce((9, ""), group, 8 * MB)] for i, p in enumerate(group)}
    rates = {"a": 4 * MB, "b": 4 * MB, "c": 4 * MB, "d": 2 * MB}
    spent = replay(traces, rates, rates, {p: 1.0 for p in group})
    ring = 2 * 3 / 4 * 8 * MB / (2 * MB)  # 6 s through d's 2 MB/s
    assert all(s.end == pytest.approx(4 + ring) for s in spent.values())
    assert spent["a"].comm == pytest.approx(3 + ring) and spent["d"].comm == pytest.approx(ring)


def test_a_trace_that_cannot_complete_is_refused():
    traces = {"a": [Compute(1)], "b": [Fetch((("a", K, MB),))]}
    with pytest.raises(ValueError, match="cannot complete"):
        replay(traces, {"a": MB, "b": MB}, {"a": MB, "b": MB}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="positive"):
        replay(traces, {"a": 0, "b": MB}, {"a": MB, "b": MB}, {"a": 1.0, "b": 1.0})


def test_a_finished_node_lingers_until_the_others_published_their_last_snapshot():
    last = ("model", 1, 0)
    traces = {
        "fast": [Publish(K), Fetch((("slow", K, 1 * MB),)), Publish(last), Linger(last)],
        "slow": [Publish(K), Fetch((("fast", K, 1 * MB),)), Publish(last), Linger(last)],
    }
    up, down = {"fast": 10 * MB, "slow": 0.5 * MB}, {"fast": 10 * MB, "slow": 10 * MB}
    spent = replay(traces, up, down, {"fast": 1.0, "slow": 1.0})
    # slow got fast's snapshot in 0.1 s, but serves its own through 0.5 MB/s: it lingers until fast has it (2 s)
    assert spent["slow"].end == pytest.approx(2.0) and spent["fast"].end == pytest.approx(2.0)
    assert spent["slow"].comm == pytest.approx(2.0)

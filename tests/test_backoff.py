"""Back-off of unreachable neighbours (node/algo/comm/backoff.py), in rounds."""

import pytest

from node.algo.comm.backoff import Backoff


def test_pauses_double_up_to_the_cap_and_a_success_clears_them():
    b = Backoff(max_rounds=4)
    tried, r = [], 0
    for r in range(40):
        if b.skip("p", r):
            continue
        tried.append(r)
        b.failed("p", r)  # unreachable every time it is tried
    # tried at 0, then after pauses of 1, 2, 4, 4, ... rounds
    assert tried[:6] == [0, 2, 5, 10, 15, 20]
    assert b.backed_off(21) == ["p"]
    assert b.succeeded("p") and not b.skip("p", 21) and b.backed_off(21) == []
    assert not b.succeeded("p")  # nothing to clear twice


def test_only_the_first_failure_is_news_and_peers_are_independent():
    b = Backoff()
    assert b.failed("a", 0) is True
    assert b.failed("a", 2) is False
    assert not b.skip("b", 1)
    with pytest.raises(ValueError):
        Backoff(max_rounds=0)

"""The final merge over a real hivemind all-reduce (two DHT nodes on 127.0.0.1)."""

import threading

import pytest
import torch

from node.algo.aggregate import mean, variance_corrected_mean
from node.net.merge import FinalMerge, same_merge
from p2pd.dht import start_dht

pytestmark = pytest.mark.integration


def two_states():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "fc.weight": torch.randn(32, 16, generator=g),
            "fc.bias": torch.randn(32, generator=g),
            "steps": torch.tensor(i),
        }
        for i in range(2)
    ]


def merge_pair(states, how="mean", digests=("", ""), timeout=30):
    """Two FinalMerge members on two DHT nodes on 127.0.0.1, run at once: their results."""
    dhts, merges, results = [], [], [None, None]

    def go(i):
        results[i] = merges[i].run(states[i])

    try:
        dhts.append(start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        dhts.append(
            start_dht(
                host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(m) for m in dhts[0].get_visible_maddrs()]
            )
        )
        merges = [
            FinalMerge(d, "mtest", states[0], group_size=2, timeout=timeout, how=how, task_digest=t)
            for d, t in zip(dhts, digests)
        ]
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 30)
        return results
    finally:
        for m in merges:
            m.close()
        for d in dhts:
            d.shutdown()


@pytest.mark.parametrize("how", ["mean", "variance_corrected"])
def test_allreduce_merge_matches_the_pure_function(how):
    states = two_states()
    results = merge_pair(states, how)
    assert all(r is not None for r in results), "the two peers did not form a group"
    expected = (variance_corrected_mean if how == "variance_corrected" else mean)(states)
    for merged, group in results:
        assert len(group) == 2
        assert same_merge(merged, expected)
        assert int(merged["steps"]) in (0, 1)  # integer buffers are not averaged
    assert results[0][1] == results[1][1]  # both agree on the group (and so on the canonical copy)


@pytest.mark.slow
def test_nodes_of_another_task_never_merge():
    """The task digest is part of the group key: two members of different tasks both miss the
    merge (and keep their models) instead of averaging each other's tensors."""
    results = merge_pair(two_states(), digests=("a" * 64, "b" * 64), timeout=8)
    assert results == [None, None]

"""The final merge over a real hivemind all-reduce (two DHT nodes on 127.0.0.1)."""

import threading

import pytest
import torch

from node.aggregate import mean, variance_corrected_mean
from node.merge import FinalMerge, same_merge
from p2pd.discovery import start_dht

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["mean", "variance_corrected"])
def test_allreduce_merge_matches_the_pure_function(how):
    g = torch.Generator().manual_seed(0)
    states = [
        {
            "fc.weight": torch.randn(32, 16, generator=g),
            "fc.bias": torch.randn(32, generator=g),
            "steps": torch.tensor(i),
        }
        for i in range(2)
    ]
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
        merges = [FinalMerge(d, "mtest", states[0], group_size=2, timeout=30, how=how) for d in dhts]
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r is not None for r in results), "the two peers did not form a group"
        expected = (variance_corrected_mean if how == "variance_corrected" else mean)(states)
        for merged, group in results:
            assert len(group) == 2
            assert same_merge(merged, expected)
            assert int(merged["steps"]) in (0, 1)  # integer buffers are not averaged
        assert results[0][1] == results[1][1]  # both agree on the group (and so on the canonical copy)
    finally:
        for m in merges:
            m.close()
        for d in dhts:
            d.shutdown()

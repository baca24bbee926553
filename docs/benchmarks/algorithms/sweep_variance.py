# Variance-corrected vs plain mean when merging independently initialised nodes, against the
# number of nodes, heterogeneity and how much gossip happened before the merge:
# .venv/bin/python docs/benchmarks/algorithms/sweep_variance.py  (output in sweep_variance.txt)
from node.app.bench.algorithms import over_seeds

for alpha in (1.0, 0.1):
    for nodes in (2, 4, 16):
        for budget in (0, 5, 20):
            out = []
            for merge in ("mean", "variance_corrected"):
                spec = {"node": {"comm": dict(gossip_budget=budget, final_merge=True, merge=merge)}, "independent": True}
                acc, std, _, _ = over_seeds(spec, nodes, {"data": {"alpha": alpha}})
                out.append(f"{100 * acc:5.1f} ± {100 * std:4.1f}")
            print(f"alpha {alpha} nodes {nodes:2d} gossip steps before the merge {budget:2d}: "
                  f"plain {out[0]}   variance-corrected {out[1]}", flush=True)

# DFedSAM: how much SAM adds to multi-step gossip, against rho, at both heterogeneity levels:
# .venv/bin/python docs/benchmarks/algorithms/sweep_sam.py  (output in sweep_sam.txt)
from node.app.bench.algorithms import over_seeds

for alpha in (0.1, 1.0):
    for q, rho in ((1, 0.0), (1, 0.05), (4, 0.0), (4, 0.01), (4, 0.05), (4, 0.1)):
        spec = {"node": {"comm": {"gossip_budget": q * 20}, "optim": {"sam_rho": rho}}}
        acc, std, _, _ = over_seeds(spec, 16, {"data": {"alpha": alpha}})
        print(f"alpha {alpha} Q={q} rho={rho:<5}: {100 * acc:.1f} ± {100 * std:.1f}", flush=True)

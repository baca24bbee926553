# Single-merge claim against the number of rounds at equal local compute (20x10, 50x4, 100x2 steps):
# .venv/bin/python docs/benchmarks/algorithms/sweep_rounds.py  (output in sweep_rounds.txt; 3 seeds, 16 nodes)
from node.app.bench.algorithms import over_seeds

for alpha in (1.0, 0.1):
    for rounds, steps in ((20, 10), (50, 4), (100, 2)):
        base = {"data": {"alpha": alpha}, "train": {"rounds": rounds, "local_steps": steps}}
        fed = over_seeds({"baseline": "fedavg"}, 16, base)
        dp = over_seeds({}, 16, base)
        for topo in ("ring", "exponential"):
            # budget: the merge plus gossip must stay under a third of D-PSGD's (ring) bytes
            per_step = dp[2] / rounds * (3.5 if topo == "exponential" else 1.0)
            budget = max(1, int((dp[2] / 3 - 1.2) / per_step))
            comm = dict(schedule="late", late_shape=1.0, gossip_budget=budget, final_merge=True, topology=topo)
            a, _, mb, _ = over_seeds({"node": {"comm": comm}}, 16, base)
            print(f"alpha {alpha} R={rounds}x{steps} fedavg {100*fed[0]:.1f} dpsgd {100*dp[0]:.1f} ({dp[2]:.1f}MB) | "
                  f"late+merge {topo} budget {budget}: {100*a:.1f} ({100*(a-fed[0]):+.1f}) {mb:.1f}MB = {mb/dp[2]:.2f} of dpsgd", flush=True)

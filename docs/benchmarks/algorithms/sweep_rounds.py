# Single-merge claim against the number of rounds at equal local compute (20x10, 50x4, 100x2 steps):
# .venv/bin/python docs/benchmarks/algorithms/sweep_rounds.py  (output in sweep_rounds.txt; 3 seeds, 16 nodes)
import statistics
from node.sim import SimConfig, Simulation
def run(alpha, **kw):
    accs, mbs = [], []
    for seed in (0, 1, 2):
        r = Simulation(SimConfig(nodes=16, alpha=alpha, width=64, seed=seed, **kw)).run()
        accs.append(statistics.fmean(r.final_accuracies)); mbs.append(r.bytes_sent / 1e6)
    return statistics.fmean(accs), statistics.fmean(mbs)
for alpha in (1.0, 0.1):
    for rounds, steps in ((20, 10), (50, 4), (100, 2)):
        fed = run(alpha, method="fedavg", rounds=rounds, local_steps=steps)
        dp = run(alpha, method="gossip", rounds=rounds, local_steps=steps)
        for topo in ("ring", "exponential"):
            # budget: the merge plus gossip must stay under a third of D-PSGD's (ring) bytes
            per_step = dp[1] / rounds * (3.5 if topo == "exponential" else 1.0)
            budget = max(1, int((dp[1] / 3 - 1.2) / per_step))
            a, mb = run(alpha, method="gossip", rounds=rounds, local_steps=steps, schedule="late", late_shape=1.0,
                        gossip_budget=budget, final_merge=True, topology=topo)
            print(f"alpha {alpha} R={rounds}x{steps} fedavg {100*fed[0]:.1f} dpsgd {100*dp[0]:.1f} ({dp[1]:.1f}MB) | "
                  f"late+merge {topo} budget {budget}: {100*a:.1f} ({100*(a-fed[0]):+.1f}) {mb:.1f}MB = {mb/dp[1]:.2f} of dpsgd", flush=True)

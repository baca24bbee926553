# Regime sweep for the single-merge claim: .venv/bin/python docs/benchmarks/algorithms/sweep_single_merge.py
# (16 nodes, digits, 20 rounds x 10 local steps, ring, 3 seeds; output in sweep_single_merge.txt)
import statistics, itertools
from dataclasses import replace
from node.sim import SimConfig, Simulation
def run(alpha, **kw):
    accs, mbs = [], []
    for seed in (0, 1, 2):
        r = Simulation(SimConfig(nodes=16, rounds=20, local_steps=10, alpha=alpha, width=64, seed=seed, **kw)).run()
        accs.append(statistics.fmean(r.final_accuracies)); mbs.append(r.bytes_sent / 1e6)
    return statistics.fmean(accs), statistics.fmean(mbs)
for alpha in (1.0, 0.1):
    fed = run(alpha, method="fedavg")
    print(f"alpha {alpha} fedavg {100*fed[0]:.1f} {fed[1]:.1f}MB")
    for shape, budget, lr_sched in itertools.product((1.0, 3.0, 8.0), (3, 5), ("constant", "cosine")):
        a, mb = run(alpha, method="gossip", schedule="late", gossip_budget=budget, late_shape=shape, final_merge=True, lr_schedule=lr_sched)
        print(f"  late shape {shape} budget {budget} lr {lr_sched}: {100*a:.1f} ({100*(a-fed[0]):+.1f}) {mb:.1f}MB")
    a, mb = run(alpha, method="gossip", gossip_budget=0, final_merge=True, lr_schedule="cosine")
    print(f"  merge only, cosine: {100*a:.1f} {mb:.1f}MB")

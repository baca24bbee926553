# Regime sweep for the single-merge claim: .venv/bin/python docs/benchmarks/algorithms/sweep_single_merge.py
# (16 nodes, digits, 20 rounds x 10 local steps, ring, 3 seeds; output in sweep_single_merge.txt)
import itertools

from node.app.bench.algorithms import over_seeds

for alpha in (1.0, 0.1):
    base = {"data": {"alpha": alpha}}
    fed = over_seeds({"baseline": "fedavg"}, 16, base)
    print(f"alpha {alpha} fedavg {100*fed[0]:.1f} {fed[2]:.1f}MB")
    for shape, budget, lr_sched in itertools.product((1.0, 3.0, 8.0), (3, 5), ("constant", "cosine")):
        comm = dict(schedule="late", gossip_budget=budget, late_shape=shape, final_merge=True)
        a, _, mb, _ = over_seeds({"node": {"comm": comm, "optim": {"schedule": lr_sched}}}, 16, base)
        print(f"  late shape {shape} budget {budget} lr {lr_sched}: {100*a:.1f} ({100*(a-fed[0]):+.1f}) {mb:.1f}MB")
    a, _, mb, _ = over_seeds({"node": {"comm": dict(gossip_budget=0, final_merge=True), "optim": {"schedule": "cosine"}}}, 16, base)
    print(f"  merge only, cosine: {100*a:.1f} {mb:.1f}MB")

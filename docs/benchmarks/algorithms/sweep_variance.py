# Variance-corrected vs plain mean when merging independently initialised nodes, against the
# number of nodes, heterogeneity and how much gossip happened before the merge:
# .venv/bin/python docs/benchmarks/algorithms/sweep_variance.py  (output in sweep_variance.txt)
import statistics

from node.sim import SimConfig, Simulation


def run(**kw):
    accs = []
    for seed in (0, 1, 2):
        r = Simulation(SimConfig(width=64, rounds=20, local_steps=10, seed=seed, shared_init=False,
                                 method="gossip", final_merge=True, **kw)).run()
        accs.append(statistics.fmean(r.final_accuracies))
    return 100 * statistics.fmean(accs), 100 * statistics.stdev(accs)


for alpha in (1.0, 0.1):
    for nodes in (2, 4, 16):
        for budget in (0, 5, 20):
            plain = run(alpha=alpha, nodes=nodes, gossip_budget=budget, merge="mean")
            corr = run(alpha=alpha, nodes=nodes, gossip_budget=budget, merge="variance_corrected")
            print(f"alpha {alpha} nodes {nodes:2d} gossip steps before the merge {budget:2d}: "
                  f"plain {plain[0]:5.1f} ± {plain[1]:4.1f}   variance-corrected {corr[0]:5.1f} ± {corr[1]:4.1f}", flush=True)

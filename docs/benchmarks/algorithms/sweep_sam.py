# DFedSAM: how much SAM adds to multi-step gossip, against rho, at both heterogeneity levels:
# .venv/bin/python docs/benchmarks/algorithms/sweep_sam.py  (output in sweep_sam.txt)
import statistics

from node.sim import SimConfig, Simulation

for alpha in (0.1, 1.0):
    for q, rho in ((1, 0.0), (1, 0.05), (4, 0.0), (4, 0.01), (4, 0.05), (4, 0.1)):
        accs = []
        for seed in (0, 1, 2):
            r = Simulation(SimConfig(nodes=16, rounds=20, local_steps=10, width=64, alpha=alpha, seed=seed,
                                     gossip_budget=q * 20, sam_rho=rho)).run()
            accs.append(statistics.fmean(r.final_accuracies))
        print(f"alpha {alpha} Q={q} rho={rho:<5}: {100 * statistics.fmean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}",
              flush=True)

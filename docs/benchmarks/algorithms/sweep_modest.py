# MoDeST with 50% / 80% of nodes unresponsive every round, 20 vs 100 rounds (8 trainers, 2 aggregators):
# .venv/bin/python docs/benchmarks/algorithms/sweep_modest.py  (output in sweep_modest.txt)
import statistics
from node.sim import SimConfig, Simulation
for alpha in (1.0, 0.1):
    for unresp in (0.5, 0.8):
        for rounds in (20, 100):
            accs, mbs, curve = [], [], None
            for seed in (0, 1, 2):
                r = Simulation(SimConfig(nodes=16, alpha=alpha, width=64, seed=seed, rounds=rounds, local_steps=10,
                                         method="modest", unresponsive=unresp, sample_size=8, aggregators=2,
                                         eval_every=max(1, rounds // 5))).run()
                accs.append(statistics.fmean(r.final_accuracies)); mbs.append(r.bytes_sent / 1e6)
                curve = [round(l.accuracy_mean, 2) for l in r.log]
            print(f"alpha {alpha} unresponsive {unresp} rounds {rounds}: {100*statistics.fmean(accs):.1f}% "
                  f"{statistics.fmean(mbs):.1f}MB, seed-2 curve {curve}", flush=True)

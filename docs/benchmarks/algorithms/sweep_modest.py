# MoDeST with 50% / 80% of nodes unresponsive every round, 20 vs 100 rounds (8 trainers, 2 aggregators):
# .venv/bin/python docs/benchmarks/algorithms/sweep_modest.py  (output in sweep_modest.txt)
from node.app.bench.algorithms import over_seeds

for alpha in (1.0, 0.1):
    for unresp in (0.5, 0.8):
        for rounds in (20, 100):
            spec = {"node": {"comm": dict(algorithm="modest", modest_trainers=8, modest_aggregators=2)},
                    "unresponsive": unresp}
            acc, _, mb, log = over_seeds(spec, 16, {"data": {"alpha": alpha}, "train": {"rounds": rounds}})
            curve = [round(x.accuracy_mean, 2) for x in log[max(1, rounds // 5) - 1::max(1, rounds // 5)]]
            print(f"alpha {alpha} unresponsive {unresp} rounds {rounds}: {100*acc:.1f}% {mb:.1f}MB, seed-2 curve {curve}",
                  flush=True)

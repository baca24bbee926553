"""24 daemons on this host (real DHT, gRPC), the one-key directory against a bucketed one, alternated.

    .venv/bin/python scripts/directory-swarm24.py --out docs/benchmarks/membership/swarm24 [--repeats 2] [--bits 2]

Each run is `atoll swarm up -c examples/swarm4.yaml --nodes 24` with settings that let 24 nodes start on a 2-core
machine (record TTL 60 s, 300 s to join, 60 s per fetch); the runs alternate net.directory_bits 0 and --bits, each
in its own swarm name. Writes each run's results.json and a table.md of the nodes' final accuracy (mean, min) and
wall time per setting, medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "net.record_ttl=60",
    "comm.join_timeout=300",
    "comm.fetch_timeout=60",
    "train.rounds=30",
]


def run(bits: int, repeat: int, out: Path) -> dict:
    """One swarm of 24 with net.directory_bits `bits`; its results.json as a dict."""
    dest = out / f"bits{bits}_run{repeat}"
    dest.mkdir(parents=True, exist_ok=True)
    sets = [*SETTINGS, f"net.directory_bits={bits}", f"net.swarm=dir{bits}r{repeat}"]
    cmd = [str(ROOT / ".venv/bin/atoll"), "swarm", "up", "-c", str(ROOT / "examples/swarm4.yaml"), "--nodes", "24"]
    cmd += [x for s in sets for x in ("--set", s)] + ["--out", str(dest)]
    with open(dest / "swarm.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=3600, check=False)
    return json.loads((dest / "results.json").read_text())


def summary(res: dict) -> dict:
    acc = [n["final_accuracy"] for n in res["nodes"] if n["final_accuracy"] is not None]
    return dict(
        nodes_finished=sum(n["state"] == "done" for n in res["nodes"]),
        accuracy_mean=statistics.mean(acc) if acc else None,
        accuracy_min=min(acc) if acc else None,
        wall_seconds=res["wall_seconds"],
        median_round_ms=res["median_round_ms"],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--first-repeat", type=int, default=0, help="Number the runs from here (to add repeats to --out).")
    args = ap.parse_args()
    for r in range(args.first_repeat, args.first_repeat + args.repeats):
        for bits in (0, args.bits):
            print(json.dumps(dict(bits=bits, repeat=r, **summary(run(bits, r, args.out)))), flush=True)
    rows = []  # every run in --out, earlier invocations' included
    for path in sorted(args.out.glob("bits*_run*/results.json")):
        bits, repeat = path.parent.name.removeprefix("bits").split("_run")
        rows.append(dict(bits=int(bits), repeat=int(repeat), **summary(json.loads(path.read_text()))))
    lines = [
        f"`.venv/bin/python scripts/directory-swarm24.py --out {args.out} --bits {args.bits}` "
        "(every run in runs.json, medians here)",
        "",
        "| directory | runs | nodes finished | final accuracy, mean over nodes | lowest node | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for bits in sorted({x["bits"] for x in rows}):
        mine = [x for x in rows if x["bits"] == bits]

        def med(k, mine=mine):
            return statistics.median(x[k] for x in mine if x[k] is not None)

        name = "one key" if bits == 0 else f"{2**bits} buckets (b = {bits})"
        lines.append(
            f"| {name} | {len(mine)} | {med('nodes_finished'):.0f} of 24 | {med('accuracy_mean'):.4f} | "
            f"{med('accuracy_min'):.4f} | {med('wall_seconds'):.0f} |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "runs.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`atoll bench membership`: the runs, tables and plot (the simulator: membership.py; wire sizes: membership_costs.py;
real DHT: membership_dht.py).

Four parts, each a table: (1) membership bytes per node per round against the swarm size, honest swarm; (2) the
attackers' share of honest views and samples against their share of identities, with and without flooding, attackers
spread one identity per network prefix (a botnet) or packed into a few prefixes, flat and hierarchical ranking; (3)
join and leave latency under churn; (4) the real DHT: bytes and seconds of one read of a key of R tickets (today's
single swarm key at R = N, a directory bucket at R of about 64), and what today's design costs at N from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from node.app.bench import write_results
from node.app.bench.membership import Costs, Scenario, simulate
from node.app.plotting import pyplot

TODAY_REFRESH_SECONDS = 1.0  # today's daemons re-read the swarm key once a second


def tail_mean(rows: list[dict], field: str, share: float = 0.25) -> float:
    """The mean of `field` over the last `share` of the rounds (the converged state)."""
    last = rows[-max(1, int(len(rows) * share)) :]
    return sum(r[field] for r in last) / len(last)


def summary(res: dict) -> dict:
    """One row of figures from a simulate() result."""
    rows = res["rounds"]
    return dict(
        **{
            k: res["scenario"][k]
            for k in ("honest", "attackers", "flood", "v", "k", "hierarchical", "attacker_prefixes")
        },
        identity_share=round(res["identities_attacker_share"], 4),
        bytes_p50=rows[-1]["bytes_p50"],
        bytes_p99=rows[-1]["bytes_p99"],
        bytes_max=rows[-1]["bytes_max"],
        view_share=round(tail_mean(rows, "attacker_share_view"), 4),
        sample_share=round(tail_mean(rows, "attacker_share_samples"), 4),
        worst_view_share=round(max(r["attacker_share_view_max"] for r in rows[-max(1, len(rows) // 4) :]), 4),
        uniformity=round(tail_mean(rows, "uniformity"), 3),
        rounds_to_uniform=res["rounds_to_uniform"],
        join_rounds=res["join_rounds"],
        leave_rounds=res["leave_rounds"],
        seconds_per_round=round(res["seconds_per_round"], 3),
        rounds=len(rows),
    )


def run(
    sizes: list[int],
    attack_honest: int,
    attackers: list[float],
    floods: list[float],
    rounds: int,
    attack_rounds: int,
    costs: Costs,
    v: int = 64,
    progress=print,
) -> dict[str, list[dict]]:
    """The simulated parts (1)-(3) (see the module docstring) as lists of summary() rows."""
    base = Scenario(v=v, boot=2 * v)
    say = lambda m: progress(m)  # noqa: E731
    scale = [summary(simulate(dataclasses.replace(base, honest=n, rounds=rounds), costs, say)) for n in sizes]
    attack = []
    for f in attackers:
        for flood in floods:
            for hier, prefixes in ((False, 0), (True, 16)):
                sc = dataclasses.replace(
                    base,
                    honest=attack_honest,
                    attackers=f,
                    flood=flood,
                    rounds=attack_rounds,
                    hierarchical=hier,
                    attacker_prefixes=prefixes,
                )
                attack.append(summary(simulate(sc, costs, say)))
    churn = [
        summary(simulate(dataclasses.replace(base, honest=attack_honest, rounds=rounds, churn=c), costs, say))
        for c in (0.002, 0.01)
    ]
    return dict(scale=scale, attack=attack, churn=churn)


def today_at(n: int, calibration: list[dict]) -> dict | None:
    """Today's single key at n members, from the calibration row of the most rows: bytes read per node per second
    (scaled linearly in rows) and the busiest DHT node's bytes per second (n readers a second), or None."""
    rows = [c for c in calibration if c["kind"] == "one key" and c["rows"] > 1]
    read = [c for c in rows if c["failed_reads"] == 0]
    if not read:
        return None
    big = max(read, key=lambda c: c["rows"])  # the largest key read whole
    per_row = big["bytes_per_read"] / big["rows"]
    busiest_row = big["busiest_node_bytes_per_read"] / big["rows"]
    fits = n <= big["rows"]
    return dict(
        bytes_per_node_s=per_row * n / TODAY_REFRESH_SECONDS,
        busiest_bytes_s=busiest_row * n * n / TODAY_REFRESH_SECONDS,
        measured=fits,
    )


def bucket_read(calibration: list[dict]) -> dict | None:
    """The calibration's read of a key the size of a directory bucket (at most 128 tickets), None without one."""
    return next((c for c in calibration if c["kind"] == "one key" and c["rows"] <= 128), None)


def sampled_dht_load(calibration: list[dict], churn: float = 0.002, round_s: float = 2.0, ttl: float = 300.0):
    """The busiest DHT node's bytes per second under sampled membership, modelled from the measured read of a bucket
    of about 64 tickets (None without one): buckets of 64 rows, each joiner reads BOOT_BUCKETS of them
    (`churn` of the nodes join per round of `round_s` s, so a bucket is read 4 * churn * 64 / round_s times a second,
    whatever the swarm's size), and each of its 64 members re-stores its row every ttl / 3 s. Flat in N."""
    from node.net.sampler import BOOT_BUCKETS

    b = bucket_read(calibration)
    if b is None:
        return None
    reads = BOOT_BUCKETS * churn * b["rows"] / round_s * b["busiest_node_bytes_per_read"]
    stores = b["rows"] * (b["busiest_node_bytes_per_read"] / b["rows"]) / (ttl / 3)
    return reads + stores


def tables(parts: dict, calibration: list[dict], costs: Costs) -> str:
    """Markdown tables of every part."""
    kb = lambda b: f"{b / 1e3:.1f}"  # noqa: E731
    out = [
        f"Wire sizes (measured, both ways, one warm gRPC connection): pull {costs.pull} B, push {costs.push} B, "
        f"probe {costs.probe} B, directory bucket read {costs.bucket_read} B.",
        "",
        "## Membership bytes per node per round (honest swarm)",
        "",
        "| nodes | KB p50 | KB p99 | KB max | uniformity | rounds to 0.75 | s/round (sim) "
        "| one key: KB/node/s | busiest DHT node KB/s: one key, sampled |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dht = sampled_dht_load(calibration)
    for r in parts["scale"]:
        today = today_at(r["honest"], calibration)
        t = (
            ""
            if today is None
            else f"{today['bytes_per_node_s'] / 1e3:,.0f}" + ("" if today["measured"] else " (fails)")
        )
        busy = "" if today is None else f"{today['busiest_bytes_s'] / 1e3:,.0f}"
        busy += "" if dht is None else f", {dht / 1e3:.1f}"
        out.append(
            f"| {r['honest']:,} | {kb(r['bytes_p50'])} | {kb(r['bytes_p99'])} | {kb(r['bytes_max'])} | "
            f"{r['uniformity']} | {r['rounds_to_uniform']} | {r['seconds_per_round']} | {t} | {busy} |"
        )
    out += [
        "",
        "## Attackers' share of honest views",
        "",
        "| attackers (identities) | flood | attackers' prefixes | ranking | share of views | share of samples | "
        "worst view | bytes p50 KB |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in parts["attack"]:
        where = "one each (botnet)" if not r["attacker_prefixes"] else f"{r['attacker_prefixes']}"
        out.append(
            f"| {r['identity_share']:.1%} | {r['flood']:g} | {where} | "
            f"{'hierarchical' if r['hierarchical'] else 'flat'} | {r['view_share']:.1%} | {r['sample_share']:.1%} | "
            f"{r['worst_view_share']:.1%} | {kb(r['bytes_p50'])} |"
        )
    out += [
        "",
        "## Churn",
        "",
        "| churn per round | join: rounds to another view (median, max) | "
        "leave: rounds to no view (median, max) | uniformity |",
        "|---:|---|---|---:|",
    ]
    for r, c in zip(parts["churn"], (0.002, 0.01)):
        j, lv = r["join_rounds"] or {}, r["leave_rounds"] or {}
        out.append(
            f"| {c:.1%} | {j.get('median')}, {j.get('max')} | {lv.get('median')}, {lv.get('max')} | "
            f"{r['uniformity']} |"
        )
    out += [
        "",
        "## Real hivemind DHT: one read of a key of R tickets",
        "",
        "| key | R | bytes per read | busiest DHT node, bytes per read | s per read | failed reads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in calibration:
        out.append(
            f"| {c['kind']} | {c['rows']:,} | {c['bytes_per_read']:,.0f} | {c['busiest_node_bytes_per_read']:,.0f} | "
            f"{c['seconds_per_read']:.3f} | {c['failed_reads']} of {c['reads']} |"
        )
    return "\n".join(out)


def write_outputs(parts: dict, calibration: list[dict], costs: Costs, out: Path, meta: dict) -> list[Path]:
    """results.json, table.md and membership.png in `out`."""
    payload = dict(meta=meta, costs=dataclasses.asdict(costs), calibration=calibration, **parts)
    paths = write_results(out, payload, f"`{meta.get('command', '')}`\n\n" + tables(parts, calibration, costs))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["honest"] for r in parts["scale"]]
    ax.plot(n, [r["bytes_p50"] / 1e3 for r in parts["scale"]], "o-", label="sampled view (Basalt), p50")
    ax.plot(n, [r["bytes_p99"] / 1e3 for r in parts["scale"]], "o--", label="sampled view (Basalt), p99")
    today = [today_at(x, calibration) for x in n]
    if all(t is not None for t in today):
        ax.plot(n, [t["bytes_per_node_s"] / 1e3 for t in today], "s-", label="one DHT key, read once a second")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("membership KB per node per round (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "membership.png", dpi=120)
    plt.close(fig)
    return [*paths, out / "membership.png"]

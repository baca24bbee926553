"""What the CLI prints for people: progress lines and tables that fit the terminal.

Every line here fits in `width` columns (80 unless the terminal says otherwise), except a
multiaddr printed alone on its own line: with a 52-character peer id it is longer than 80
columns and cannot be broken without breaking a copy and paste.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.table import Table


def width() -> int:
    """Columns of the terminal (the COLUMNS variable wins), 80 when it is not a terminal."""
    return shutil.get_terminal_size((80, 24)).columns


def size(n: float) -> str:
    """Bytes as a short human figure: 512B, 12.3kB, 4.5MB, 1.2GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


def fit(fields: Iterable[str], columns: int) -> str:
    """Fields joined by two spaces, dropping fields from the end until the line fits."""
    kept = [f for f in fields if f]
    while len(kept) > 1 and len("  ".join(kept)) > columns:
        kept.pop()
    return "  ".join(kept)


def with_path(text: str, path: object, columns: int) -> str:
    """`text path` on one line if it fits, else the path alone on the next line."""
    line = f"{text} {path}"
    return line if len(line) <= columns else f"{text}\n  {path}"


def score_text(metric: str, value: float | None) -> str:
    """A task's metric value for people: `96.2%` for accuracy, `0.0123` for any other."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.4g}"


def round_line(e: dict[str, Any], columns: int) -> str:
    """One trainer round: the most useful fields first, the rest as far as the width allows."""
    r = f"{e['round']:>{len(str(e['rounds']))}}"
    return fit(
        [
            f"round {r}/{e['rounds']}",
            f"acc {100 * e['score']:5.1f}%" if e["metric"] == "accuracy" else f"{e['metric']} {e['score']:.4g}",
            f"loss {e['loss']:.4f}",
            f"mixed {e['mixed']}/{max(0, e['peers'] - 1)}",
            f"{e['seconds']:.2f}s",
            f"sent {size(e['sent_bytes'])}",
            f"recv {size(e['received_bytes'])}",
        ],
        columns,
    )


def ready_lines(e: dict[str, Any], what: str, join_command: str) -> list[str]:
    """A node, expert or router is up: who, where, and how others join it (`join_command`
    then `--initial-peers MADDR`, each MADDR alone on a line)."""
    lines = [
        f"{what} {e['peer_id']} ready",
        fit(
            [
                f"  gRPC {e['grpc']}",
                f"metrics :{e['metrics_port']}" if e.get("metrics_port") else "",
                e.get("device", "") + (f" ({e['threads']} threads)" if e.get("threads") else ""),
                f"{e['dataset_size']} samples" if "dataset_size" in e else "",
                f"from round {e['start_round']}" if "start_round" in e else "",
            ],
            width(),
        ),
    ]
    if e["maddrs"]:
        lines.append(f"  join with: {join_command} --initial-peers MADDR, MADDR being one of:")
        lines += [f"    {m}" for m in e["maddrs"]]
    return lines


def waiting_line(e: dict[str, Any]) -> str:
    """The console line while a node waits for peers: how many more of `want` it needs (`live` are live) and the
    seconds left of comm.join_timeout."""
    missing = e["want"] - e["live"]
    return (
        f"waiting for {missing} more node{'s' if missing != 1 else ''} ({e['live']} of {e['want']} live; "
        f"{e['seconds_left']} s left of comm.join_timeout)"
    )


def swarm_table(runs, rounds: int, elapsed: float, columns: int) -> Table:
    """The live table of `atoll swarm up`: one row per node, no vertical rules, widths chosen
    so that 80 columns show every column in full (the peer id is cut to its last 6 chars)."""
    t = Table(
        title=f"atoll swarm, {elapsed:.0f} s",
        caption="mixed: neighbours' models mixed in the last round / other live nodes",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        expand=False,
    )
    cols = [
        ("node", "right"),
        ("model", "left"),
        ("round", "right"),
        ("score", "right"),
        ("loss", "right"),
        ("mixed", "right"),
        ("sent", "right"),
        ("state", "left"),
    ]
    wide = columns >= 100
    if wide:
        cols.insert(2, ("peer id", "left"))
    for name, justify in cols:
        t.add_column(name, justify=justify, no_wrap=True)
    for r in runs:
        last = r.last or {}
        state = r.final["event"] if r.final else ("training" if r.ready else "starting")
        row = [
            str(r.index),
            r.model,
            f"{last.get('round', 0)}/{rounds}",
            score_text(last.get("metric", "accuracy"), last.get("score")),
            f"{last['loss']:.3f}" if "loss" in last else "-",
            f"{last['mixed']}/{max(0, last['peers'] - 1)}" if "mixed" in last else "-",
            size(last.get("sent_bytes", 0)),
            state,
        ]
        if wide:
            row.insert(2, (r.ready or {}).get("peer_id", "")[-12:])
        t.add_row(*row)
    return t


_REACH = {"direct": "direct", "relayed": "relay", "outbound_only": "pushed"}  # the path peers take to it


def status_table(records, columns: int) -> Table:
    """`atoll status`: one row per live record; trainers show their round, throughput and compute utilization,
    experts their cluster, routers their role only; `reach` (shown when the terminal is wide
    or some node is not directly reachable) is the path peers take to the node's snapshots:
    direct gRPC, a libp2p relay, or pushed through its carrier."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    wide = columns >= 160  # the whole peer id (52 characters) and the reach column fit
    reach = wide or any(r.reachability != "direct" for r in records)
    narrow = columns < (120 if reach else 100)  # the metrics port and device give way, so what is shown is readable
    cols = {
        "peer id": ("left", lambda r: r.peer_id if wide else "…" + r.peer_id[-8:]),
        "gRPC": ("left", lambda r: r.grpc_address),
        "reach": (
            "left",
            lambda r: _REACH[r.reachability] + (f" via …{r.carrier[-6:]}" if r.carrier and not narrow else ""),
        ),
        "metrics": ("right", lambda r: str(r.metrics_port or "-")),
        "role": ("left", lambda r: ",".join(r.roles) + (f" {r.cluster}" if r.cluster >= 0 else "")),
        "round": ("right", lambda r: str(r.round) if "trainer" in r.roles else "-"),
        "device": ("left", lambda r: r.device),
        "samples/s": ("right", lambda r: f"{r.samples_per_second:.0f}" if "trainer" in r.roles else "-"),
        "util": ("right", lambda r: f"{r.utilization:.0%}" if "trainer" in r.roles else "-"),
        "data": ("right", lambda r: str(r.dataset_size)),
    }
    hidden = {"reach"} if not reach else set()
    hidden |= {"metrics", "device"} if narrow else set()
    hidden |= {"data"} if narrow and reach and columns < 100 else set()
    shown = [c for c in cols if c not in hidden]
    for name in shown:
        t.add_column(name, justify=cols[name][0], no_wrap=True)
    for r in records:
        t.add_row(*(cols[name][1](r) for name in shown))
    return t

"""The `atoll` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from p2pd import __version__

app = typer.Typer(help="atoll: a peer-to-peer training daemon.", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that compare atoll against baselines measured in the same run.", no_args_is_help=True)
identity_app = typer.Typer(help="The node's Ed25519 identity (its libp2p peer id).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(identity_app, name="identity")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"--sizes must be comma-separated integers (MiB), got {text!r}")
    if not sizes or any(not 1 <= s <= 4096 for s in sizes):
        _fail("--sizes must list sizes between 1 and 4096 MiB")
    return sizes


@app.command()
def version() -> None:
    """Print the atoll version."""
    typer.echo(__version__)


@identity_app.command("show")
def identity_show(
    key: Path = typer.Option(Path("~/.atoll/node.key"), help="Key file; created (mode 0600) if missing."),
) -> None:
    """Print the peer id of the key at KEY, creating the key on first use."""
    from p2pd.identity import Identity, IdentityError

    try:
        identity = Identity.load_or_create(key)
    except (IdentityError, OSError) as e:
        _fail(str(e))
    typer.echo(identity.peer_id)


@bench_app.command("transport")
def bench_transport(
    sizes: str = typer.Option("10,100,400", help="State dict sizes in MiB, comma-separated."),
    repeats: int = typer.Option(3, min=1, max=20, help="Runs per path and size; the best is reported."),
    skip_hivemind: bool = typer.Option(False, "--skip-hivemind", help="Leave out hivemind's libp2p stream (slowest)."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON instead of a table."),
    out: Optional[Path] = typer.Option(None, help="Also write results.json, table.md and transport.png here."),
) -> None:
    """Snapshot exchange throughput (GB/s) on loopback: atoll's gRPC path vs a bare gRPC byte
    stream, hivemind's libp2p stream, and an in-process copy (the physical limit)."""
    from node.bench import transport

    size_list = _parse_sizes(sizes)
    paths = tuple(p for p in transport.PATHS if not (skip_hivemind and p == "hivemind"))

    def progress(row):
        typer.echo(f"  {row.size_mb:>5} MiB  {row.path:<11} {row.gbps:7.3f} GB/s", err=True)

    typer.echo(f"bench transport: sizes {size_list} MiB, best of {repeats}, paths {', '.join(paths)}", err=True)
    rows = transport.run(size_list, repeats=repeats, paths=paths, progress=progress)
    if as_json:
        typer.echo(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        typer.echo(transport.table(rows))
    if out is not None:
        meta = {"sizes_mib": size_list, "repeats": repeats, "command": " ".join(["atoll", *sys.argv[1:]])}
        for path in transport.write_outputs(rows, out, meta):
            typer.echo(f"wrote {path}", err=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()

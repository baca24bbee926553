"""`atoll identity show`: a node's Ed25519 key and peer id."""

from __future__ import annotations

from pathlib import Path

import typer

from node.app.cli.common import (
    fail,
)

identity_app = typer.Typer(help="The node's Ed25519 identity (its libp2p peer id).", no_args_is_help=True)


@identity_app.command("show")
def identity_show(
    key: Path = typer.Option(Path("~/.atoll/node.key"), help="Key file; created (mode 0600) if missing."),
) -> None:
    """Print the peer id of the key at KEY, creating the key on first use."""
    from p2pd.identity import Identity, IdentityError

    try:
        identity = Identity.load_or_create(key)
    except (IdentityError, OSError) as e:
        fail(str(e))
    typer.echo(identity.peer_id)

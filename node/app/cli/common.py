"""What every command group shares: the joining options, config loading, one-line errors, Ctrl-C handling,
reading the swarm's records, and JSON events."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer

SET_HELP = "Override a config field, e.g. --set train.rounds=20 --set data.alpha=0.1 (repeatable)."

# The options of every command that joins a swarm (node start, expert train --serve, router
# serve): one definition, so the commands cannot drift apart.
PEERS_OPTION = typer.Option([], "--initial-peers", "-p", help="Multiaddr of a swarm member (repeatable).")
IDENTITY_OPTION = typer.Option(None, "--identity", help="Node key file (created on first start); net.identity_path.")


DIRECTORY_BITS_HELP = "The swarm's net.directory_bits (its DHT directory split into 2^bits keys)."


def join_overrides(initial_peers: list[str], identity: Path | None, **more) -> dict:
    """Config overrides from the joining options (None: not given, keep the config's)."""
    extra = {"net.identity_path": str(identity) if identity else None, **more}
    if initial_peers:
        extra["net.initial_peers"] = list(initial_peers)
    return extra


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM handler of a long-running command: the first signal calls
    `target` (finish the step, checkpoint, leave) and says so; a second one quits at once
    (hivemind's children notice and stop themselves, see p2pd/procs.py). Before `target` is
    set, nothing has started and the first signal just exits."""

    def __init__(self, target=None, message: str = "stopping after the current step"):
        """Installs itself as the SIGINT and SIGTERM handler. `target`: called with no arguments at the first signal;
        None (until it is set) makes that signal exit with status 128 + signum. `message`: what the first signal writes
        to stderr when there is a target. Raises ValueError off the main thread (signal.signal)."""
        import signal

        self.target, self.count, self.message = target, 0, message
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum: int, frame) -> None:
        """Signal handler: the first signal asks the target to stop after the current step, a second exits at once."""
        import os
        import signal

        self.count += 1
        if self.target is None:
            raise SystemExit(128 + signum)
        if self.count > 1:
            os._exit(128 + signum)
        # os.write: print() is not safe here if the main thread was interrupted mid-write
        os.write(2, f"\n{signal.Signals(signum).name}: {self.message} (again to quit at once)\n".encode())
        self.target()


def load(config: Path | None, sets: list[str], extra: dict | None = None):
    """The NodeConfig of `config` (a YAML file or None), `sets` (--set k=v) and `extra` overrides (None values
    skipped); a ConfigError is one line and exit 2."""
    from node.config import ConfigError, load_config, parse_override

    try:
        overrides = dict(parse_override(s) for s in sets)
        overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))


def json_event(e: dict) -> None:
    """Print event `e` as one JSON line (--json-events: what `atoll swarm up` reads)."""
    print(json.dumps(e), flush=True)


SWARM_HINT = (
    "if your nodes use another net.swarm, name it with --swarm NAME (the examples use demo, lab, mylab, mixed)"
)


@contextlib.contextmanager
def observer(peers: list[str], swarm_name: str, directory_bits: int = 0):
    """A client-mode DHT member with a throwaway identity, for commands that only read the
    swarm's records; a bad multiaddr or an unreachable swarm is one error line."""
    import tempfile

    from p2pd.addresses import check_maddr
    from p2pd.discovery import Discovery, DiscoveryError
    from p2pd.identity import Identity

    with tempfile.TemporaryDirectory() as tmp:
        try:
            peers = [check_maddr(p) for p in peers]
            d = Discovery(
                Identity.load_or_create(Path(tmp) / "observer.key"),
                swarm=swarm_name,
                initial_peers=peers,
                client_mode=True,
                directory_bits=directory_bits,
            ).start()
        except (DiscoveryError, ValueError) as e:
            fail(str(e).splitlines()[0])
        try:
            yield d
        finally:
            d.close()


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit 2: a user's mistake is one line, never a traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def int_list(text: str, option: str, lo: int, hi: int) -> list[int]:
    """A comma-separated list of integers in [lo, hi], or one clear error line."""
    return _number_list(text, option, lo, hi, int, "integers")


def float_list(text: str, option: str, lo: float, hi: float) -> list[float]:
    """A comma-separated list of numbers in [lo, hi], or one clear error line."""
    return _number_list(text, option, lo, hi, float, "numbers")


def _number_list(text: str, option: str, lo, hi, kind, name: str) -> list:
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated {name}, got {text!r}")
    if not values or any(not lo <= v <= hi for v in values):
        fail(f"{option} must list {name} between {lo} and {hi}")
    return values


def names_or_fail(text: str, option: str, available) -> list[str]:
    """The comma-separated names in `text` (`all`: every one of `available`); an unknown one fails naming `option`
    and the available names."""
    names = list(available) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        fail(f"{option}: unknown {unknown or text!r}; available: {', '.join(available)}")
    return names

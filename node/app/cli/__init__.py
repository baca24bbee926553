"""The `atoll` command line, one module per command group; app.py wires them (`main`)."""

from node.app.cli.app import app, main

__all__ = ["app", "main"]

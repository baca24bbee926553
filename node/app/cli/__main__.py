"""`python -m node.app.cli`: the `atoll` command."""

from node.app.cli.app import main

main()

"""``python -m attnreg`` runs the CLI."""

from attnreg.cli import main

main()

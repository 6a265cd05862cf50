"""`python -m opir_engine`: the `opir` command, where the console script is not on PATH."""

from opir_engine.cli.app import main

main()

"""`python -m clients.cli`: lpctl without its console script."""

from clients.cli.main import main

main()

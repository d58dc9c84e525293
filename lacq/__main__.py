"""`python -m lacq`: the command line."""

from lacq.cli import main

main()

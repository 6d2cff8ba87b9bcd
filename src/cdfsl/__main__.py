"""`python -m cdfsl`: the same command line as `cdfsl`."""

from cdfsl.cli import main

main()

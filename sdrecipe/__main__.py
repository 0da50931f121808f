"""`python -m sdrecipe` runs the command line."""

from sdrecipe.cli import main

main()

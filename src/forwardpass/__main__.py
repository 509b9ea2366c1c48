"""`python -m forwardpass` runs the command line."""

from forwardpass.cli import main

main()

"""`python -m tardigrade.cli`: the `tardigrade` command."""

from tardigrade.cli import run

run()

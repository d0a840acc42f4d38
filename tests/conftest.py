"""Shared fixtures. Real services only: they are started here (or in tests/emulators.py) on free loopback ports."""

pytest_plugins = ["tests.emulators"]

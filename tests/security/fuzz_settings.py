"""Hypothesis settings shared by the fuzzing tests (tests/security/test_fuzz_*.py).

Derandomized, so a failure in CI is the same failure on a laptop; a fixed number of examples keeps each test to a
few seconds. ``TARDIGRADE_FUZZ_EXAMPLES=5000`` runs a longer, still derandomized, campaign locally.

The per-example deadline catches an input that makes the code under test blow up (a backtracking regex, an alias
bomb: seconds, then minutes), not a slow machine: a typical example takes milliseconds, but on a loaded CI machine
one can be descheduled for a second, and Hypothesis fails the test when an example overruns its deadline once and
not when replayed ("Unreliable test timings"). So the deadline given is stretched by `LOADED_MACHINE_FACTOR`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

LOADED_MACHINE_FACTOR = 10


def fuzz_settings(examples: int, deadline_ms: int = 2000) -> settings:
    """``deadline_ms``: what one example may take on an idle machine, a hundred times its typical time or more."""
    return settings(
        max_examples=int(os.environ.get("TARDIGRADE_FUZZ_EXAMPLES", examples)),
        deadline=timedelta(milliseconds=deadline_ms * LOADED_MACHINE_FACTOR),
        derandomize=True,
        database=None,  # nothing written into the checkout; derandomize makes failures reproducible anyway
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )

"""Hypothesis settings shared by the fuzzing tests (tests/security/test_fuzz_*.py).

Derandomized, so a failure in CI is the same failure on a laptop; a fixed number of examples and a per-example
deadline keep each test to a few seconds. ``TARDIGRADE_FUZZ_EXAMPLES=5000`` runs a longer, still derandomized,
campaign locally.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings


def fuzz_settings(examples: int, deadline_ms: int = 2000) -> settings:
    return settings(
        max_examples=int(os.environ.get("TARDIGRADE_FUZZ_EXAMPLES", examples)),
        deadline=timedelta(milliseconds=deadline_ms),
        derandomize=True,
        database=None,  # nothing written into the checkout; derandomize makes failures reproducible anyway
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )

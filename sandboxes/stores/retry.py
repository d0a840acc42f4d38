"""Retries for transient object-store failures, shared by the S3, GCS and Azure backends.

Cloud stores throttle (429/503 SlowDown), hiccup (500/502/504) and drop connections; a snapshot of thousands of
objects must ride through that instead of failing the step. Each backend switches its SDK's own retries off and
wraps every request in `retry_call`, so all three behave the same: a bounded number of attempts with exponential
backoff and full jitter (racing workers do not retry in lockstep). "Missing" and "precondition failed" are
answers, not failures, and are never retried; neither is anything the backend already turned into a `StoreError`.
"""

from __future__ import annotations

import http.client
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tardigrade.sandboxes.stores.base import StoreError

T = TypeVar("T")

log = logging.getLogger("tardigrade.stores")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. The defaults ride out ~15 s of throttling or a brief outage, then give up."""

    attempts: int = 6
    base_delay: float = 0.2  # seconds before the first retry (upper bound of the jitter window)
    max_delay: float = 8.0

    def delay(self, retry_number: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**n)] (the AWS architecture blog's recommendation)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2**retry_number)))


DEFAULT_POLICY = RetryPolicy()


class Transient(Exception):
    """Raised inside a retried operation to ask for another attempt, e.g. while a conflicting conditional write
    by another worker is still in flight."""


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:  # every SDK here sits on urllib3; requests only under GCS and Azure
        import urllib3.exceptions

        types += [urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover - urllib3 comes with all three SDKs
        pass
    try:
        import requests.exceptions

        types += [
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ]
    except ImportError:
        pass
    return tuple(types)


_NETWORK_ERRORS = _network_error_types()


def is_network_error(error: BaseException) -> bool:
    """A dropped, refused or timed-out connection, whatever library raised it."""
    return isinstance(error, _NETWORK_ERRORS)


def is_transient_status(status: int | None) -> bool:
    """HTTP statuses worth another try: request timeout, throttling and server-side errors."""
    return status is not None and (status in (408, 429) or 500 <= status <= 599) and status != 501


def retry_call(
    operation: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``operation`` until it succeeds, a non-transient error occurs, or the attempts run out; then re-raise
    the last error for the backend to explain. ``what`` (e.g. "GET packs/ab/ab12... from s3://b/p") is logged
    with each retry and must not contain credentials."""
    attempt = 1
    while True:
        try:
            return operation()
        except StoreError:
            raise  # already an answer (ObjectMissing) or an explained failure
        except Exception as e:
            if not (isinstance(e, Transient) or is_transient(e)) or attempt >= policy.attempts:
                raise
            delay = policy.delay(attempt - 1)
            log.warning(
                "%s failed with %s; retrying in %.2fs (attempt %d of %d)",
                what,
                type(e).__name__,
                delay,
                attempt + 1,
                policy.attempts,
            )
            sleep(delay)
            attempt += 1

"""`CloudStore`: what the S3, GCS and Azure stores share - a key prefix, our own retries, one error mapping.

Each cloud backend switches its SDK's retries off and sends every request through `CloudStore._call`, which
retries transient failures (`retry.py`) and turns whatever is left into an `ObjectMissing` (an answer), a
`StoreUnavailable` when the service is down or throttling (an outage to wait out), or a `StoreError` that says what
to check when no retry can help (access denied, a bad bucket). A backend supplies only what differs: which of its
SDK's errors are transient, which mean "not found", and how to explain the rest (access denied, an HTTP status).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

from tardigrade.sandboxes.stores.base import ObjectStore, StoreError, StoreUnavailable, check_key
from tardigrade.sandboxes.stores.retry import RetryPolicy, Transient, retry_call

T = TypeVar("T")


class CloudStore(ObjectStore):
    """Base of the object stores that talk to a cloud service. Subclasses set the attributes below."""

    #: The service's name in messages ("the S3 endpoint", "GCS", "Azure Blob Storage").
    service: ClassVar[str]
    #: What to check when the service cannot be reached, appended to that message.
    reach_advice: ClassVar[str] = "check the endpoint and the network"
    #: Whether an SDK error may be chained to ours. Azure's transport errors can hold a SAS signature in their URL.
    chain_sdk_errors: ClassVar[bool] = True

    url: str
    endpoint: str
    _key_prefix: str
    _retry: RetryPolicy

    def _key(self, key: str) -> str:
        return self._key_prefix + check_key(key)

    # -- what each backend says about its SDK's errors ---------------------------------------------------------

    @abstractmethod
    def _is_transient(self, e: BaseException) -> bool:
        """Worth another attempt: throttling, 5xx, a dropped connection."""

    @abstractmethod
    def _not_found(self, e: BaseException, key: str | None) -> StoreError | None:
        """An `ObjectMissing` (or a missing bucket/container) if ``e`` says something is not there, else None."""

    @abstractmethod
    def _explain_sdk_error(self, what: str, e: BaseException) -> StoreError | None:
        """The backend's own explanation (access denied, an HTTP status and message), or None."""

    # -- shared ------------------------------------------------------------------------------------------------

    def _call(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one request with retries; turn whatever is left into an `ObjectMissing` or an explained error."""
        what = f"{op} {key!r} in {self.url}" if key else f"{op} {self.url}"
        try:
            return retry_call(fn, is_transient=self._is_transient, what=what, policy=self._retry)
        except StoreError:
            raise
        except Exception as e:
            missing = self._not_found(e, key)
            if missing is not None:
                raise missing from None
            if self.chain_sdk_errors:
                raise self._explain(what, e) from e
            raise self._explain(what, e) from None

    def _explain(self, what: str, e: BaseException) -> StoreError:
        explained = self._explain_sdk_error(what, e)
        if explained is not None:
            # Throttling or 5xx that outlasted the retries is an outage: the caller may wait it out.
            if self._is_transient(e) and not isinstance(explained, StoreUnavailable):
                return StoreUnavailable(str(explained))
            return explained
        if isinstance(e, Transient):
            return StoreUnavailable(f"{what}: {e}; another writer kept the key busy, try again later")
        if self._is_transient(e):
            return StoreUnavailable(
                f"{what}: cannot reach {self.service} at {self.endpoint} ({type(e).__name__}) after"
                f" {self._retry.attempts} attempts; {self.reach_advice}"
            )
        detail = f": {e}" if self.chain_sdk_errors else ""
        return StoreError(f"{what} failed: {type(e).__name__}{detail}")

    def _still_failing(self) -> str:
        """Appended to a transient HTTP status that outlasted the retries."""
        return f" (still failing after {self._retry.attempts} attempts; the service is throttling or down)"

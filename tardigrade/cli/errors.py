"""What the CLI says when a command fails: one line that says what happened and what to do, and an exit code.

Exit codes: 0 success; 1 the run failed (or was cancelled or terminated); 2 the command cannot do what was asked
(bad input, Temporal unreachable, no worker, unknown run or snapshot, missing store); 3 a bug in Tardigrade
(`--debug` shows the traceback). A Python traceback reaches the terminal only with `--debug`.
"""

from __future__ import annotations

from temporalio.client import WorkflowFailureError, WorkflowQueryFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from tardigrade.cli.output import UsageError, current_connection, failure_message

FAILED = 1
CANNOT = 2
BUG = 3


def _where() -> str:
    conn = current_connection()
    return f" in namespace {conn.namespace!r} on {conn.address}" if conn else ""


def _rpc(error: RPCError) -> str:
    message = error.message.strip().splitlines()[0] if error.message.strip() else error.status.name
    if error.status == RPCStatusCode.NOT_FOUND:
        if message.lower().startswith("namespace"):
            conn = current_connection()
            name = repr(conn.namespace) if conn else "the namespace"
            return f"namespace {name} does not exist on this server; pass --namespace (or TEMPORAL_NAMESPACE) with one"
        if message.lower().startswith("workflow not found for id: "):
            return f"there is no run {message[27:]!r}{_where()}; `tardigrade list` shows the runs there"
        if "workflow" in message.lower():
            return f"{message}{_where()}; `tardigrade list` shows the runs there"
    if error.status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
        return (
            f"Temporal refused the request ({message}); check the API key (TEMPORAL_API_KEY or the profile's"
            " api_key) or client certificate, and that they grant this namespace"
        )
    if error.status == RPCStatusCode.UNAVAILABLE:
        return f"Temporal became unreachable ({message}); check that the server is up and retry"
    return f"Temporal said: {message}"


def explain(error: BaseException) -> tuple[str, int] | None:
    """The one line to print for an expected failure, and its exit code; None for anything unexpected (a bug)."""
    from tardigrade.client import ConnectionConfigError, NoWorker, TemporalUnavailable
    from tardigrade.devserver import ServerError
    from tardigrade.pipeline import PipelineError
    from tardigrade.sandboxes.errors import TardigradeError
    from tardigrade.sandboxes.stores import StoreError

    expected = (
        UsageError,
        PipelineError,
        TardigradeError,
        StoreError,
        ServerError,
        ConnectionConfigError,
        TemporalUnavailable,
        NoWorker,
    )
    if isinstance(error, expected):
        return str(error), CANNOT
    if isinstance(error, WorkflowFailureError):
        return f"the run failed: {failure_message(error)}", FAILED
    if isinstance(error, WorkflowAlreadyStartedError):
        return f"a run with id {error.workflow_id!r} already exists{_where()}; pick another --id", CANNOT
    if isinstance(error, WorkflowQueryFailedError):
        return f"the run could not answer its status query: {error.message}", CANNOT
    if isinstance(error, RPCError):
        return _rpc(error), CANNOT
    return None

"""What the activities report besides their results: metrics, trace spans and one structured log line per step.

Metrics go through Temporal's own metric meter, so they leave the worker by whatever the worker's Temporal
`Runtime` exports (`tardigrade worker --metrics HOST:PORT` serves Prometheus text beside Temporal's own
``temporal_*`` metrics): checkpoint time and bytes, live sandboxes; the workflow counts rehydrations
(workflows/pipeline.py, through the replay-safe workflow meter). Spans use OpenTelemetry when it is installed
(extra ``otel``) and the plugin traces (``TardigradePlugin(tracing=True)``): a sandbox command is a span inside
its activity's span, inside the workflow's, inside the client's start. Without OpenTelemetry they cost nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from temporalio import activity
from temporalio.runtime import Runtime

from tardigrade.activities.contract import SnapshotRef, StepOutcome

log = logging.getLogger("tardigrade.steps")


def checkpoint_taken(ref: SnapshotRef, provider: str) -> None:
    meter = activity.metric_meter().with_additional_attributes({"provider": provider})
    meter.create_histogram_float(
        "tardigrade_checkpoint_seconds", "Time to snapshot a sandbox after a step", "s"
    ).record(ref.seconds)
    meter.create_counter(
        "tardigrade_checkpoint_bytes", "Bytes a checkpoint stored that the store did not hold yet", "By"
    ).add(ref.bytes_new)


def sandboxes_live(count: int) -> None:
    """How many sandboxes this worker's activities created and have not destroyed. A gauge of the worker, so it is
    set on its runtime's meter: the activity's meter would make one series per activity type."""
    runtime = activity.client().service_client.config.runtime or Runtime.default()
    runtime.metric_meter.create_gauge("tardigrade_sandboxes", "Sandboxes live on this worker").set(count)


def step_finished(name: str, outcome: StepOutcome, fields: Mapping[str, Any]) -> None:
    """One log record per step attempt, with its facts as structured fields (``tardigrade`` in the record's
    extra; `tardigrade worker --log-format json` prints them as JSON)."""
    label = f"step {outcome.index + 1} ({name})"
    facts = {
        "event": "step finished",
        "step": outcome.index + 1,
        "step_name": name,
        "exit_code": outcome.exit_code,
        "ok": outcome.ok,
        "seconds": outcome.seconds,
        "output_bytes": outcome.output_bytes,
        **fields,
    }
    activity.logger.info(
        "%s: exit %s in %.1f s", label, outcome.exit_code, outcome.seconds, extra={"tardigrade": facts}
    )


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, str | int]) -> Iterator[None]:
    """A trace span around sandbox work, a child of the activity's span; nothing without OpenTelemetry."""
    try:
        from opentelemetry import trace
    except ImportError:
        yield
        return
    with trace.get_tracer("tardigrade").start_as_current_span(name, attributes=dict(attributes)):
        yield

"""How a worker process is watched: Prometheus metrics, OpenTelemetry tracing and structured (JSON) logs.

    tardigrade worker --metrics 127.0.0.1:9464 --tracing --log-format json

- Metrics: a Temporal `Runtime` that serves Prometheus text at http://HOST:PORT/metrics: Temporal's own worker
  metrics (``temporal_*``: task latencies, slots, polls) and ours (activities/telemetry.py).
- Tracing: temporalio.contrib.opentelemetry's interceptor, so one trace runs from the client's start through the
  workflow, its activities and their sandbox commands. It uses OpenTelemetry's global tracer provider: the
  ``--tracing`` option installs the SDK's, exporting over OTLP to OTEL_EXPORTER_OTLP_ENDPOINT (the usual OTel
  variables apply) when opentelemetry-exporter-otlp is installed. Both need the ``otel`` extra.
- Logs: `JsonLogFormatter` prints one JSON object per record, with a step's facts (activities/telemetry.py) as
  fields, for log pipelines that index them.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

OTEL_EXTRA = "pip install 'tardigrade-temporal[otel]'"


class ObservabilityUnavailable(RuntimeError):
    """A requested exporter's package is not installed."""


def metrics_runtime(bind_address: str) -> Runtime:
    """A Temporal runtime whose metrics (Temporal's and Tardigrade's) are served for Prometheus at HOST:PORT."""
    host, _, port = bind_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics {bind_address!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    config = PrometheusConfig(bind_address=bind_address, durations_as_seconds=True)
    return Runtime(telemetry=TelemetryConfig(metrics=config))


def tracing_interceptor() -> Any:
    """Temporal's OpenTelemetry interceptor (for clients and workers alike)."""
    try:
        from temporalio.contrib.opentelemetry import TracingInterceptor
    except ImportError:
        raise ObservabilityUnavailable(f"tracing needs OpenTelemetry: {OTEL_EXTRA}") from None
    return TracingInterceptor()


def install_otlp_tracing(service_name: str = "tardigrade-worker") -> str:
    """Set the global tracer provider to the OpenTelemetry SDK's, exporting spans over OTLP (gRPC). Returns where
    they go. Raises `ObservabilityUnavailable` naming the package when the SDK or the exporter is missing."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ObservabilityUnavailable(f"--tracing needs the OpenTelemetry SDK: {OTEL_EXTRA}") from None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
    except ImportError:
        raise ObservabilityUnavailable(
            "--tracing exports over OTLP: pip install opentelemetry-exporter-otlp (or install your own tracer"
            " provider and pass TardigradePlugin(tracing=True))"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return str(getattr(exporter, "_endpoint", "the OTLP endpoint"))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, Temporal's activity/workflow context when the
    record has it, and a step's facts (the ``tardigrade`` extra) as fields of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for context in ("temporal_activity", "temporal_workflow"):
            if isinstance(getattr(record, context, None), dict):
                line[context.removeprefix("temporal_")] = getattr(record, context)
        facts = getattr(record, "tardigrade", None)
        if isinstance(facts, dict):
            line.update(facts)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)

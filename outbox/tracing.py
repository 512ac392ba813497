"""W3C trace context (`traceparent`, `tracestate`) in event headers, when OpenTelemetry is
installed (extra `otel`): the writer captures the active span's; the consumer
(outbox/consumer/tracing.py) continues it in its `process` span."""

from __future__ import annotations

from collections.abc import Mapping

try:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # OpenTelemetry is optional (extra `otel`).
    TraceContextTextMapPropagator = None  # type: ignore[assignment, misc]

TRACE_HEADERS = ("traceparent", "tracestate")

_propagator = (
    TraceContextTextMapPropagator() if TraceContextTextMapPropagator is not None else None
)


def current_trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate` when the span has one) of the current span; empty
    without OTel or a valid span."""
    if _propagator is None:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return {name: carrier[name] for name in TRACE_HEADERS if carrier.get(name)}


def with_trace_headers(headers: Mapping[str, str], trace: Mapping[str, str]) -> Mapping[str, str]:
    """`headers` with the captured context added, unless the event carries a context of its
    own (its `traceparent` wins, and a `tracestate` belongs with its `traceparent`)."""
    if not trace or "traceparent" in headers:
        return headers
    return {**headers, **trace}

"""Captures the active OpenTelemetry span as a W3C `traceparent` header, when OTel is installed."""

from __future__ import annotations

try:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # OpenTelemetry is optional (extra `otel`).
    TraceContextTextMapPropagator = None  # type: ignore[assignment, misc]

_propagator = (
    TraceContextTextMapPropagator() if TraceContextTextMapPropagator is not None else None
)


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, or None without OTel or a valid span."""
    if _propagator is None:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")

"""The consumer's `process` span around each handler call, when OpenTelemetry is installed.

OpenTelemetry's messaging conventions: a span of kind CONSUMER named `process <topic>`, the
child of the context the writer captured into the event's headers (`traceparent`,
`tracestate`: outbox/tracing.py) and linked to it, so the application's request, the event and
its handling are one trace. Events the handler writes are captured with this span, and a dead
letter keeps the original headers (dead_letters.py), so both stay in the trace. Without OTel
(no `otel` extra) the handler runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from outbox.consumer.message import Message

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # OpenTelemetry is optional (extra `otel`).
    trace = None  # type: ignore[assignment]

TRACER = "outbox.consumer"

_propagator = TraceContextTextMapPropagator() if trace is not None else None


def attributes(message: Message, group: str) -> dict[str, Any]:
    """The messaging semantic conventions' attributes of a Kafka message's processing."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": message.topic,
        "messaging.destination.partition.id": str(message.partition),
        "messaging.message.id": str(message.id),
        "messaging.consumer.group.name": group,
        "messaging.kafka.message.key": message.aggregate_id,
        "messaging.kafka.offset": message.offset,
    }


@contextmanager
def process_span(message: Message, group: str) -> Iterator[None]:
    """Run the block (a handler call) as the current `process` span of `message`; an
    exception leaving it is recorded on the span, which then ends with an error status."""
    if trace is None or _propagator is None:
        yield
        return
    parent = _propagator.extract(message.headers)
    creation = trace.get_current_span(parent).get_span_context()
    links = [Link(creation)] if creation.is_valid else None
    tracer = trace.get_tracer(TRACER)
    with tracer.start_as_current_span(
        f"process {message.topic}", context=parent, kind=SpanKind.CONSUMER,
        attributes=attributes(message, group), links=links,
    ):
        yield

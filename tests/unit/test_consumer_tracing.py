"""The consumer's process span and the writer's trace headers, with OTel's in-memory exporter."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import outbox
from outbox.consumer.message import Message
from outbox.consumer.tracing import process_span
from outbox.tracing import current_trace_headers
from tests.support.tracing import spans

__all__ = ["spans"]

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "vendor=v1,other=x"


def message(headers: dict[str, str]) -> Message:
    return Message(id=uuid.uuid4(), event_type="OrderPlaced", aggregate_type="Order",
                   aggregate_id="o-1", payload=b"{}", topic="orders", partition=2, offset=41,
                   headers=headers)


def test_the_handler_runs_in_a_consumer_span_child_of_and_linked_to_the_writers(
    spans: InMemorySpanExporter
) -> None:
    received = message({"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "tenant": "eu"})
    with process_span(received, "billing"):
        inside = current_trace_headers()
    [span] = spans.get_finished_spans()
    assert span.name == "process orders" and span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert span.parent is not None and span.parent.span_id == 0xb7ad6b7169203331
    assert [link.context.span_id for link in span.links] == [0xb7ad6b7169203331]
    assert span.attributes == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.destination.partition.id": "2",
        "messaging.message.id": str(received.id),
        "messaging.consumer.group.name": "billing",
        "messaging.kafka.message.key": "o-1",
        "messaging.kafka.offset": 41,
    }
    # What the handler writes is captured with its span, and the tracestate travels on.
    ids = span.context
    assert inside["traceparent"] == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-01"
    assert inside["tracestate"] == TRACESTATE


def test_a_failing_handler_leaves_an_error_on_its_span(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), process_span(message({"traceparent": TRACEPARENT}), "billing"):
        raise ValueError("payment service said no")
    [span] = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_an_event_without_a_context_starts_a_trace_of_its_own(
    spans: InMemorySpanExporter
) -> None:
    with process_span(message({}), "billing"):
        pass
    [span] = spans.get_finished_spans()
    assert span.parent is None and list(span.links) == []


def test_the_writer_captures_traceparent_and_tracestate_unless_the_event_has_its_own(
    spans: InMemorySpanExporter
) -> None:
    incoming = TraceContextTextMapPropagator().extract(
        {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    tracer = trace.get_tracer("test")
    own = {"traceparent": "00-11111111111111111111111111111111-2222222222222222-01"}
    with tracer.start_as_current_span("POST /orders", context=incoming) as span:
        plain, carried = outbox.Outbox().records([
            outbox.Event("Order", "1", "OrderPlaced", {}),
            outbox.Event("Order", "2", "OrderPlaced", {}, headers=own)])
    context = span.get_span_context()
    assert plain.headers == {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-01",
        "tracestate": TRACESTATE,
    }
    assert carried.headers == own, "an event's own context is kept whole"

"""One trace from an HTTP-like request span in the writer to the consumer's handler span,
through the real relay and Kafka; dead letters and the handler's own events stay in it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import outbox
from outbox.consumer import Consumer, Message
from outbox.consumer import dead_letters as dlq
from relay.settings import RelaySettings
from tests.integration.test_consumer import FAST_RETRY, kafka_settings, make_topic
from tests.support.kafka import TopicReader
from tests.support.relays import RelayThread
from tests.support.tracing import spans

__all__ = ["spans"]

pytestmark = pytest.mark.integration

# The request's incoming context, as an HTTP server would extract it from its headers.
REQUEST_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "shop=checkout"


def traceparent_of(span: Any) -> str:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def test_one_trace_from_the_writers_request_to_the_handler_through_the_relay(
    db_url: str, kafka_bootstrap: str, spans: InMemorySpanExporter
) -> None:
    topic, replies = make_topic(kafka_bootstrap), make_topic(kafka_bootstrap)
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE applied (event_id uuid PRIMARY KEY)")
    placed = outbox.Event(topic, "o-1", "OrderPlaced", {"ok": True})
    refused = outbox.Event(topic, "o-2", "OrderPlaced", {"ok": False})
    incoming = TraceContextTextMapPropagator().extract(
        {"traceparent": REQUEST_TRACEPARENT, "tracestate": TRACESTATE})
    tracer = trace.get_tracer("test.shop")
    with tracer.start_as_current_span("POST /orders", context=incoming,
                                      kind=SpanKind.SERVER) as request, \
            psycopg.connect(db_url) as conn:
        outbox.publish(conn, placed, refused)

    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=db_url, retry=FAST_RETRY)

    @consumer.handler("OrderPlaced")
    def handle(conn: psycopg.Connection[Any], message: Message) -> None:
        if not message.json()["ok"]:
            raise ValueError("payment service said no")
        conn.execute("INSERT INTO applied VALUES (%s)", [message.id])
        # A reply written by the handler, in its transaction: captured with its span.
        outbox.publish(conn, outbox.Event(replies, "o-1", "OrderBilled", {}))

    settings = RelaySettings(source="postgres-poll", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, poll_interval=0.2)
    reader = TopicReader(kafka_bootstrap, replies, dlq.topic_for(dlq.DEFAULT_TEMPLATE, topic))
    with RelayThread(settings):
        stats = consumer.run(max_messages=2, timeout=60)
        assert (stats.processed, stats.dead_lettered) == (1, 1)
        received = reader.read_until(lambda got: len(got) >= 2, timeout=60)
    reader.close()

    finished = spans.get_finished_spans()
    [writer_span] = [s for s in finished if s.name == "POST /orders"]
    processing = [s for s in finished if s.name == f"process {topic}"]
    assert all(s.kind is SpanKind.CONSUMER for s in processing)
    request_context = request.get_span_context()
    for span in processing:  # one trace: the writer's request span is every call's parent
        assert span.context.trace_id == request_context.trace_id
        assert span.parent is not None and span.parent.span_id == request_context.span_id
        assert [link.context.span_id for link in span.links] == [request_context.span_id]
        assert span.context.trace_state.get("shop") == "checkout"
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "kafka"
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["messaging.consumer.group.name"] == "billing"
    # A batch whose other message fails is rolled back and handled again: a span per call.
    ok = [s for s in processing if s.attributes
          and s.attributes["messaging.message.id"] == str(placed.id)]
    failed = [s for s in processing if s.attributes
              and s.attributes["messaging.message.id"] == str(refused.id)]
    assert ok and all(s.status.status_code is StatusCode.UNSET for s in ok)
    assert [s.status.status_code for s in failed] == [StatusCode.ERROR] * FAST_RETRY.tries
    assert writer_span.context.trace_id == request_context.trace_id

    by_topic = {message.topic: message for message in received}
    letter = by_topic[dlq.topic_for(dlq.DEFAULT_TEMPLATE, topic)]
    assert letter.headers["id"] == str(refused.id)
    assert letter.headers["traceparent"] == traceparent_of(request)
    assert letter.headers["tracestate"] == TRACESTATE
    reply = by_topic[replies]
    assert reply.headers["traceparent"] in {traceparent_of(s) for s in ok}, (
        "the reply continues the trace from its handler's span")
    assert reply.headers["tracestate"] == TRACESTATE

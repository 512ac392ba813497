"""Typed events end to end: published as models, relayed by the real polling relay through real
Kafka, handled as models by the consumer; an invalid payload is dead-lettered with the
validation error."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import psycopg
import pydantic
import pytest

import outbox
from outbox.consumer import Consumer, Message
from outbox.consumer import dead_letters as dlq
from outbox.contracts.registry import VERSION_HEADER, EventRegistry
from relay.settings import RelaySettings
from tests.integration.test_consumer import kafka_settings, make_topic
from tests.support.kafka import TopicReader
from tests.support.relays import RelayThread

pytestmark = pytest.mark.integration

events = EventRegistry()


@events.event_type("OrderCreated", aggregate="Order", version=1, id_field="order_id")
@dataclasses.dataclass
class OrderCreated:
    order_id: uuid.UUID
    total: float
    placed_at: dt.datetime


@events.event_type("OrderCreated", aggregate="Order", version=2, id_field="order_id")
class OrderCreatedV2(pydantic.BaseModel):
    order_id: uuid.UUID
    total_cents: int = pydantic.Field(ge=0)


def test_typed_events_travel_through_the_relay_and_invalid_ones_are_dead_lettered(
    db_url: str, kafka_bootstrap: str
) -> None:
    topic = make_topic(kafka_bootstrap)
    first, second, bad = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    placed = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE totals (order_id uuid PRIMARY KEY, cents int NOT NULL,"
                     " version int NOT NULL, event_id uuid NOT NULL)")
        ids = outbox.publish(
            conn,
            OrderCreated(first, 12.5, placed),
            OrderCreatedV2(order_id=second, total_cents=300),
            # A writer that does not use the types wrote a payload version 1 cannot read.
            outbox.Event("Order", str(bad), "OrderCreated", {"order_id": "nope"},
                         headers={VERSION_HEADER: "1"}),
        )
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with RelayThread(RelaySettings(source="postgres-poll", db_url=db_url,
                                       kafka_bootstrap=kafka_bootstrap, poll_interval=0.2,
                                       topic_template=topic)):
            relayed = reader.read_ids({str(i) for i in ids}, timeout=60)
    finally:
        reader.close()
    assert [m.headers[VERSION_HEADER] for m in relayed] == ["1", "2", "1"]

    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=db_url)

    @consumer.handler(OrderCreated, OrderCreatedV2)
    def record_total(conn: psycopg.Connection[Any], event: OrderCreated | OrderCreatedV2,
                     message: Message) -> None:
        if isinstance(event, OrderCreated):
            cents, version = round(event.total * 100), 1
        else:
            cents, version = event.total_cents, 2
        conn.execute("INSERT INTO totals VALUES (%s, %s, %s, %s)",
                     [event.order_id, cents, version, message.id])

    stats = consumer.run(max_messages=3, timeout=60)
    assert (stats.processed, stats.dead_lettered) == (2, 1)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT order_id, cents, version, event_id FROM totals"
                            " ORDER BY version").fetchall()
    assert rows == [(first, 1250, 1, ids[0]), (second, 300, 2, ids[1])]

    letters = TopicReader(kafka_bootstrap, dlq.topic_for(dlq.DEFAULT_TEMPLATE, topic))
    try:
        [letter] = letters.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        letters.close()
    assert letter.headers["id"] == str(ids[2])
    assert letter.headers[dlq.ATTEMPTS] == "1"
    assert letter.headers[dlq.ERROR] == (
        "RejectMessage: invalid OrderCreated v1 (OrderCreated): order_id: expected a UUID, "
        "got str 'nope'")

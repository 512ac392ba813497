"""Schema Registry formats against a real registry (Apicurio Registry on loopback, its
Confluent-compatible API), the real polling relay and Kafka: Avro, Protobuf and JSON Schema
payloads framed by the writer, published unchanged, read back by the consumer."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import outbox
from outbox.consumer import Consumer, Message
from outbox.contracts import wire
from outbox.contracts.registry import VERSION_HEADER, EventRegistry
from outbox.contracts.schema_registry import SchemaRegistryFormats
from relay.settings import RelaySettings
from tests.integration.test_consumer import kafka_settings, make_topic
from tests.support.kafka import TopicReader
from tests.support.relays import RelayThread

# The first run builds the registry with Maven (minutes); later runs start it in seconds.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ORDER_PLACED_AVRO = json.dumps({
    "type": "record", "name": "OrderPlaced", "namespace": "shop",
    "fields": [{"name": "order_id", "type": "string"}, {"name": "total_cents", "type": "long"}],
})

events = EventRegistry()


@events.event_type("OrderPaid", aggregate="Order", id_field="order_id")
@dataclasses.dataclass
class OrderPaid:
    order_id: str
    cents: int


def shipped_class() -> Any:
    """A Protobuf message class built from its descriptor (what protoc would generate)."""
    proto = descriptor_pb2.FileDescriptorProto(name="shop/shipping.proto", package="shop",
                                               syntax="proto3")
    message = proto.message_type.add(name="OrderShipped")
    for number, name in enumerate(("order_id", "carrier"), start=1):
        message.field.add(name=name, number=number, label=1,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.OrderShipped"))


OrderShipped = shipped_class()


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from deploy.local.schema_registry import SchemaRegistryProcess

    process = SchemaRegistryProcess(Path(tmp_path_factory.mktemp("schema-registry")))
    try:
        yield process.start()
    finally:
        process.stop()


def test_framed_payloads_travel_unchanged_and_are_read_back(
    registry_url: str, db_url: str, kafka_bootstrap: str
) -> None:
    with SchemaRegistryFormats(registry_url) as formats:
        check_round_trip(formats, db_url, kafka_bootstrap)


def check_round_trip(formats: SchemaRegistryFormats, db_url: str, kafka_bootstrap: str) -> None:
    topic = make_topic(kafka_bootstrap)
    order = str(uuid.uuid4())
    written = [
        formats.avro("Order", order, "OrderPlaced", {"order_id": order, "total_cents": 1250},
                     ORDER_PLACED_AVRO, headers={"tenant": "eu"}),
        formats.json(OrderPaid(order_id=order, cents=1250)),
        formats.protobuf("Order", order, "OrderShipped", OrderShipped(order_id=order,
                                                                      carrier="dhl")),
    ]
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *written)

    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with RelayThread(RelaySettings(source="postgres-poll", db_url=db_url,
                                       kafka_bootstrap=kafka_bootstrap, poll_interval=0.2,
                                       topic_template=topic)):
            relayed = reader.read_ids({str(e.id) for e in written}, timeout=60)
    finally:
        reader.close()
    # The relay publishes the writer's bytes as they are, with their content type.
    assert [(m.value, m.headers["content_type"]) for m in relayed] == [
        (e.payload, e.content_type) for e in written]
    assert relayed[1].headers[VERSION_HEADER] == "1"
    # Each payload names the schema registered under its event type's subject.
    for event, subject in zip(written, ("Order.OrderPlaced", "Order.OrderPaid",
                                        "Order.OrderShipped"), strict=True):
        assert wire.schema_id(event.payload) == (
            formats.client.get_latest_version(subject).schema_id)

    seen: list[Any] = []
    consumer = Consumer(name="shipping", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=db_url)

    @consumer.handler("OrderPlaced", "OrderShipped")
    def raw(conn: psycopg.Connection[Any], message: Message) -> None:
        seen.append(formats.decode(message, protobuf_type=OrderShipped))

    @consumer.handler(OrderPaid)  # a typed handler reads the JSON Schema payload as its model
    def paid(conn: psycopg.Connection[Any], event: OrderPaid) -> None:
        seen.append(event)

    stats = consumer.run(max_messages=3, timeout=60)
    assert (stats.processed, stats.dead_lettered) == (3, 0)
    assert seen == [{"order_id": order, "total_cents": 1250}, OrderPaid(order, 1250),
                    OrderShipped(order_id=order, carrier="dhl")]
    assert formats.decode(_message(written[1], topic)) == {"order_id": order, "cents": 1250}


def _message(event: outbox.Event, topic: str) -> Message:
    return Message(id=event.id, event_type=event.event_type, aggregate_type=event.aggregate_type,
                   aggregate_id=event.aggregate_id, payload=event.payload, topic=topic,
                   partition=0, offset=0, content_type=event.resolved_content_type)


def test_a_value_the_schema_refuses_fails_before_anything_is_written(registry_url: str) -> None:
    with SchemaRegistryFormats(registry_url) as formats:
        with pytest.raises(outbox.InvalidEventError, match="cannot be serialised for subject "
                                                           "'Order.OrderPlaced'"):
            formats.avro("Order", "1", "OrderPlaced", {"order_id": "1", "total_cents": "many"},
                         ORDER_PLACED_AVRO)
        with pytest.raises(outbox.EventValidationError, match="cents: expected an integer"):
            formats.json(OrderPaid(order_id="1", cents="many"))  # type: ignore[arg-type]


def test_without_auto_register_an_unknown_schema_is_refused(registry_url: str) -> None:
    with SchemaRegistryFormats(registry_url, auto_register=False,
                               subject_template="unregistered.{event_type}") as formats, \
            pytest.raises(outbox.InvalidEventError, match="unregistered.OrderPlaced"):
        formats.avro("Order", "1", "OrderPlaced", {"order_id": "1", "total_cents": 1},
                     ORDER_PLACED_AVRO)

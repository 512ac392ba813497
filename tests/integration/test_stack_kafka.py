"""Smoke test of the local Kafka broker: create a topic, produce idempotently, read it back."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

# NewTopic's documented home is confluent_kafka.admin, whose stubs do not re-export it.
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined, unused-ignore]

pytestmark = pytest.mark.integration


def test_produce_and_consume_roundtrip(kafka_bootstrap: str) -> None:
    topic = f"smoke-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # Created explicitly: auto-creation is a demo convenience that tests must not rely on.
    for future in admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)]
    ).values():
        future.result(timeout=30)
    try:
        key, value = b"order-42", b'{"type": "OrderPlaced"}'
        headers: list[tuple[str, str | bytes | None]] = [
            ("event-id", uuid.uuid4().bytes),
            ("content-type", b"application/json"),
        ]
        reports: list[tuple[KafkaError | None, Message]] = []

        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "acks": "all", "enable.idempotence": True}
        )
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=lambda err, msg: reports.append((err, msg)),
        )
        assert producer.flush(30) == 0, "the delivery report did not arrive within 30 s"
        assert len(reports) == 1
        error, delivered = reports[0]
        assert error is None, error
        assert delivered.offset() == 0

        consumer = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": f"smoke-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        try:
            # assign(), not subscribe(): no group rebalance to wait for, and the offset is exact.
            consumer.assign([TopicPartition(topic, 0, 0)])
            received = _poll_one(consumer, timeout=30)
        finally:
            consumer.close()

        assert received.key() == key
        assert received.value() == value
        assert received.headers() == headers
        assert received.offset() == 0
    finally:
        for future in admin.delete_topics([topic]).values():
            future.result(timeout=30)


def _poll_one(consumer: Consumer, *, timeout: float) -> Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        error = message.error()
        assert error is None, error
        return message
    pytest.fail(f"no message consumed within {timeout:.0f} s")

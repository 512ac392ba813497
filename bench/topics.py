"""Kafka for the suite: topics stamped with log-append time, end offsets, reading topics back."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def create(bootstrap: str, names: list[str], partitions: int = 1) -> None:
    """Create topics whose message timestamp is the broker's append time (the ack time)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    config = {"message.timestamp.type": "LogAppendTime"}
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)
         for name in names],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=10).topics
        if all(
            name in topics
            and len(topics[name].partitions) == partitions
            and all(p.leader >= 0 for p in topics[name].partitions.values())
            for name in names
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {names} have no leader after 30 s")


def delete(bootstrap: str, names: list[str]) -> None:
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(KafkaException):  # already gone: nothing to clean
            future.result(timeout=60)


class EndOffsets:
    """How many messages topics hold (high watermarks), without consuming them."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-offsets-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        })
        self._partitions: dict[str, list[int]] = {}

    def count(self, topic: str) -> int:
        if topic not in self._partitions:
            metadata = self._consumer.list_topics(topic, timeout=10)
            self._partitions[topic] = sorted(metadata.topics[topic].partitions)
        total = 0
        for partition in self._partitions[topic]:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False)
            total += high - low
        return total

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True, slots=True)
class Delivered:
    """What the ledger and the latency figures need of one Kafka message."""

    event_id: bytes  # 16 bytes
    key: str
    seq: int
    append_ms: int  # the broker's log-append time


def read_all(bootstrap: str, topic: str, timeout: float = 300.0) -> Iterator[Delivered]:
    """Every message of `topic`, from the first offset to the end offsets read at the start.

    Call it when nothing writes to the topic any more (the relay has stopped): reading up to
    known end offsets finishes exactly, without waiting for a quiet period.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "fetch.max.bytes": str(64 * 1024 * 1024),
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        ends: dict[int, int] = {}
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False)
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} back took more than {timeout:.0f} s")
            for message in consumer.consume(num_messages=10_000, timeout=1.0):
                error = message.error()
                if error is not None:
                    raise KafkaException(error)
                kind, append_ms = message.timestamp()
                if kind != TIMESTAMP_LOG_APPEND_TIME:
                    raise RuntimeError(f"topic {topic} is not stamped with LogAppendTime")
                event_id = dict(message.headers() or []).get("id")
                if not isinstance(event_id, bytes):
                    raise RuntimeError(f"a message of {topic} has no id header")
                key = message.key()
                yield Delivered(
                    event_id=uuid.UUID(event_id.decode()).bytes,
                    key=key.decode() if key else "",
                    seq=int(json.loads(message.value() or b"{}")["seq"]),
                    append_ms=append_ms,
                )
                partition, offset = message.partition(), message.offset()
                if partition in ends and offset is not None and offset + 1 >= ends[partition]:
                    del ends[partition]
    finally:
        consumer.close()

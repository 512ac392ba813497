"""Re-publishes dead letters to their original topic with their original headers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from outbox.consumer import dead_letters
from outbox.consumer.errors import ReplayError
from outbox.consumer.settings import consumer_settings, producer_settings, valid_topic
from outbox.errors import ConfigurationError

log = logging.getLogger("outbox.consumer")

DEFAULT_GROUP = "outbox-dlq-replay"
_BATCH = 500


@dataclass
class ReplayResult:
    replayed: int = 0
    skipped: int = 0  # dead letters without an original topic (and no target topic given)


def replay(
    kafka: Mapping[str, Any],
    topic: str,
    *,
    max_messages: int | None = None,
    group: str = DEFAULT_GROUP,
    target_topic: str | None = None,
    idle_timeout: float = 10.0,
    allow_unsafe_kafka_settings: bool = False,
) -> ReplayResult:
    """Move dead letters of `topic` back to their original topic (or `target_topic`).

    Reads with the consumer group `group`, so a second replay continues where the first
    stopped; a dead letter's offset is committed only after Kafka acknowledged its copy.
    Returns at the end of the topic, after `max_messages`, or after `idle_timeout` seconds
    without a message or an assignment.
    """
    if not valid_topic(topic):
        raise ConfigurationError(f"topic {topic!r} is not a valid Kafka topic name")
    if target_topic is not None and not valid_topic(target_topic):
        raise ConfigurationError(f"target topic {target_topic!r} is not a valid topic name")
    if max_messages is not None and max_messages < 1:
        raise ConfigurationError(f"max_messages={max_messages} must be >= 1")
    settings = consumer_settings(group, kafka, allow_unsafe=allow_unsafe_kafka_settings)
    settings.update({"enable.partition.eof": "true", "auto.offset.reset": "earliest"})
    try:
        consumer = KafkaConsumer(settings)
        producer = Producer(producer_settings(settings))
    except KafkaException as exc:
        raise ReplayError(f"cannot create the Kafka clients: {exc}") from exc
    assigned: set[tuple[str, int]] = set()
    at_end: set[tuple[str, int]] = set()

    def on_assign(_: Any, partitions: list[TopicPartition]) -> None:
        assigned.update((p.topic, p.partition) for p in partitions)

    def on_revoke(_: Any, partitions: list[TopicPartition]) -> None:
        assigned.difference_update((p.topic, p.partition) for p in partitions)

    failures: list[str] = []

    def delivered(err: KafkaError | None, _: Any) -> None:
        if err is not None:
            failures.append(str(err))

    result = ReplayResult()
    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    idle_since = time.monotonic()
    try:
        while max_messages is None or result.replayed + result.skipped < max_messages:
            limit = _BATCH if max_messages is None else min(
                _BATCH, max_messages - result.replayed - result.skipped
            )
            messages = consumer.consume(limit, 0.5)
            offsets: dict[tuple[str, int], int] = {}
            failures.clear()
            sent = 0
            for message in messages:
                error = message.error()
                tp = (message.topic() or "", message.partition() or 0)
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(tp)
                        continue
                    if error.fatal():
                        raise ReplayError(f"reading {topic} failed: {error}")
                    log.warning("kafka consume error", extra={"event": "kafka_consume_error",
                                                              "error": str(error)})
                    continue
                at_end.discard(tp)
                offsets[tp] = (message.offset() or 0) + 1
                headers = message.headers() or []
                original, restored = dead_letters.original(
                    list(headers.items()) if isinstance(headers, dict) else headers
                )
                destination = target_topic or original
                if destination is None or not valid_topic(destination):
                    result.skipped += 1
                    log.warning("dead letter without an original topic skipped", extra={
                        "event": "replay_skipped", "topic": tp[0], "partition": tp[1],
                        "offset": message.offset()})
                    continue
                _produce(producer, destination, message.key(), message.value(), restored,
                         delivered)
                sent += 1
            if sent:
                remaining = producer.flush(60)
                if remaining or failures:
                    raise ReplayError(
                        f"{len(failures) + remaining} replayed messages were not acknowledged "
                        f"({'; '.join(failures[:3]) or 'timed out'}); their dead letters stay "
                        "uncommitted, run the replay again"
                    )
                result.replayed += sent
            if offsets:
                consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    asynchronous=False,
                )
                idle_since = time.monotonic()
            elif (assigned and assigned <= at_end) or (
                time.monotonic() - idle_since > idle_timeout
            ):
                break
    except KafkaException as exc:
        raise ReplayError(f"replaying {topic} failed: {exc}") from exc
    finally:
        consumer.close()
        producer.flush(10)
    log.info("dead letters replayed", extra={"event": "dlq_replayed", "topic": topic,
                                             "replayed": result.replayed,
                                             "skipped": result.skipped})
    return result


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes | None,
             headers: dead_letters.OutHeaders, on_delivery: Any) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers,  # type: ignore[arg-type]
                             on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)

"""The consumer's Kafka side (confluent-kafka): fetch in partition order, commit offsets that
the tracker allows, write dead letters and wait for their delivery reports."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from outbox.consumer import dead_letters
from outbox.consumer.engine import DeadLetterRequest
from outbox.consumer.errors import KafkaConsumeError
from outbox.consumer.message import Received, parse
from outbox.consumer.offsets import OffsetTracker
from outbox.consumer.offsets import TopicPartition as TP

log = logging.getLogger("outbox.consumer")

# Slack on top of message.timeout.ms: flush() returns only once every dead letter has a report.
_FLUSH_SLACK = 5.0


class KafkaGateway:
    """One Kafka consumer in a group, and a producer for dead letters (made on first use).

    Not thread-safe: the asyncio consumer calls it from one worker thread only.
    """

    def __init__(
        self,
        *,
        consumer_settings: dict[str, Any],
        producer_settings: dict[str, Any],
        topics: Sequence[str],
        name: str,
        dead_letter_template: str,
        validate_json: bool = True,
        tracker: OffsetTracker | None = None,
        on_rebalance: Callable[[str, list[TP]], None] | None = None,
    ) -> None:
        self.tracker = tracker or OffsetTracker()
        self._topics = list(topics)
        self._name = name
        self._template = dead_letter_template
        self._validate_json = validate_json
        self._producer_settings = producer_settings
        self._producer: Producer | None = None
        self._on_rebalance = on_rebalance
        try:
            self._consumer = KafkaConsumer({**consumer_settings, "error_cb": self._on_error})
        except KafkaException as exc:
            raise KafkaConsumeError(f"cannot create the Kafka consumer: {exc}") from exc
        self.assignment: set[TP] = set()
        # Partitions revoked or lost during the current fetch.
        self._moved: set[tuple[str | None, int | None]] = set()

    # -- group membership --------------------------------------------------------------------------

    def subscribe(self) -> None:
        try:
            self._consumer.subscribe(
                self._topics, on_assign=self._assigned, on_revoke=self._revoked,
                on_lost=self._lost,
            )
        except KafkaException as exc:
            raise KafkaConsumeError(f"subscribing to {self._topics} failed: {exc}") from exc

    def _assigned(self, _: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self.assignment.update(tps)
        log.info("partitions assigned", extra={"event": "partitions_assigned",
                                               "partitions": _show(tps)})
        if self._on_rebalance:
            self._on_rebalance("assigned", tps)

    def _revoked(self, _: Any, partitions: list[TopicPartition]) -> None:
        # Called inside consume(), between batches: everything fetched is resolved or left for
        # redelivery, so committing here hands the partitions over without a duplicate.
        tps = [(p.topic, p.partition) for p in partitions]
        self.commit(tps)
        self.tracker.forget(tps)
        self.assignment.difference_update(tps)
        self._moved.update(tps)
        log.info("partitions revoked", extra={"event": "partitions_revoked",
                                              "partitions": _show(tps)})
        if self._on_rebalance:
            self._on_rebalance("revoked", tps)

    def _lost(self, _: Any, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: committing now could move its offsets back.
        tps = [(p.topic, p.partition) for p in partitions]
        self.tracker.forget(tps)
        self.assignment.difference_update(tps)
        self._moved.update(tps)
        log.warning("partitions lost", extra={"event": "partitions_lost",
                                              "partitions": _show(tps)})
        if self._on_rebalance:
            self._on_rebalance("lost", tps)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("kafka fatal error", extra={"event": "kafka_fatal", "error": str(error)})
        else:
            log.warning("kafka client error", extra={"event": "kafka_error", "error": str(error)})

    # -- fetching ---------------------------------------------------------------------------------

    def fetch(self, limit: int, timeout: float) -> list[Received]:
        """Up to `limit` records, waiting at most `timeout` for the first; the rest are only
        those already buffered, so a quiet topic costs no batching latency."""
        try:
            raws = self._consumer.consume(1, timeout)
            if raws and limit > 1:
                self._moved.clear()
                more = self._consumer.consume(limit - 1, 0)
                if self._moved:
                    # A rebalance ran inside that call: the first record may belong to a
                    # partition taken away (it will be fetched again from its committed offset).
                    raws = [r for r in raws if (r.topic(), r.partition()) not in self._moved]
                raws += more
        except KafkaException as exc:
            raise KafkaConsumeError(f"kafka consumer failed: {exc}") from exc
        received = []
        for raw in raws:
            error = raw.error()
            if error is not None:
                self._fetch_error(error)
                continue
            _, timestamp = raw.timestamp()
            item = parse(
                raw.topic() or "",
                raw.partition() or 0,
                raw.offset() or 0,
                raw.key(),
                raw.value(),
                _headers(raw.headers()),
                timestamp if timestamp >= 0 else None,
                validate_json=self._validate_json,
            )
            self.tracker.fetched(item.position)
            received.append(item)
        return received

    def _fetch_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaConsumeError(f"kafka consumer failed: {error}")
        log.warning("kafka consume error", extra={"event": "kafka_consume_error",
                                                  "error": str(error)})

    # -- offsets ----------------------------------------------------------------------------------

    def commit(self, partitions: Sequence[TP] | None = None) -> bool:
        """Synchronously commit what the tracker allows; False if Kafka refused (the messages
        will then be delivered again and skipped by the inbox)."""
        offsets = self.tracker.committable(partitions)
        if not offsets:
            return True
        request = [TopicPartition(topic, partition, offset)
                   for (topic, partition), offset in offsets.items()]
        try:
            result = self._consumer.commit(offsets=request, asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed", extra={"event": "offset_commit_failed",
                                                        "error": str(exc)})
            return False
        done = {}
        ok = True
        for tp in result or request:
            if tp.error is not None:
                ok = False
                log.warning("offset commit failed", extra={
                    "event": "offset_commit_failed", "partition": f"{tp.topic}[{tp.partition}]",
                    "error": str(tp.error)})
            else:
                done[(tp.topic, tp.partition)] = offsets[(tp.topic, tp.partition)]
        self.tracker.committed(done)
        return ok

    # -- dead letters -----------------------------------------------------------------------------

    def _dead_letter_producer(self) -> Producer:
        if self._producer is None:
            try:
                self._producer = Producer({**self._producer_settings, "error_cb": self._on_error})
            except KafkaException as exc:
                raise KafkaConsumeError(f"cannot create the dead-letter producer: {exc}") from exc
        return self._producer

    def dead_letter(self, requests: Sequence[DeadLetterRequest]) -> list[str | None]:
        """Produce every dead letter and wait for its delivery report; returns, per request,
        None when Kafka acknowledged it, else the error."""
        producer = self._dead_letter_producer()
        results: list[str | None] = ["no delivery report"] * len(requests)

        def reporter(index: int) -> Callable[[KafkaError | None, Any], None]:
            def report(error: KafkaError | None, _: Any) -> None:
                results[index] = str(error) if error is not None else None

            return report

        for index, request in enumerate(requests):
            received = request.received
            topic = dead_letters.topic_for(self._template, received.position.topic)
            headers = dead_letters.headers_for(
                received, self._name, request.reason, request.attempts
            )
            while True:
                try:
                    producer.produce(
                        topic,
                        value=received.value,
                        key=received.key,
                        headers=headers,  # type: ignore[arg-type]
                        on_delivery=reporter(index),
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    results[index] = str(exc)
                    break
        timeout = float(self._producer_settings.get("message.timeout.ms", 30000)) / 1000
        producer.flush(timeout + _FLUSH_SLACK)
        return results

    def close(self) -> None:
        """Leave the group (revocation commits what is resolved) and close the clients."""
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the kafka consumer failed",
                        extra={"event": "kafka_close_failed", "error": str(exc)})
        if self._producer is not None:
            self._producer.flush(5)


def _headers(raw: Any) -> list[tuple[str, bytes | str | None]]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return list(raw.items())
    return list(raw)


def _show(tps: Sequence[TP]) -> str:
    return ",".join(f"{topic}[{partition}]" for topic, partition in sorted(tps))

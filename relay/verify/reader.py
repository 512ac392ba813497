"""Reads the scratch topic while the run goes on: every event id delivered, in the order read
(per partition, the order Kafka holds), and when each was first seen."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from relay.verify.plan import KafkaAccess


class TopicReader:
    def __init__(self, kafka: KafkaAccess, topic: str) -> None:
        self.topic = topic
        self.delivered: list[str] = []  # every delivery, duplicates included
        self.seen: set[str] = set()
        self.unreadable = 0  # messages without an id header (not written by verify's writers)
        self.error: str | None = None
        self._consumer = Consumer({
            **kafka.client_config(),
            "group.id": f"outbox-verify-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        })
        metadata = self._consumer.list_topics(topic, timeout=10)
        self._partitions = sorted(metadata.topics[topic].partitions)
        self._consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in self._partitions])
        self._positions = dict.fromkeys(self._partitions, 0)  # next offset per partition
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="verify-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._consume(0.2)
        except Exception as exc:  # reported with the verdict: the read-back is incomplete
            self.error = str(exc) or type(exc).__name__

    def _consume(self, timeout: float) -> None:
        messages = self._consumer.consume(num_messages=10_000, timeout=timeout)
        with self._lock:
            for message in messages:
                error = message.error()
                if error is not None:
                    raise KafkaException(error)
                headers = dict(message.headers() or [])
                event_id = headers.get("id")
                if isinstance(event_id, bytes):
                    decoded = event_id.decode()
                    self.delivered.append(decoded)
                    self.seen.add(decoded)
                else:
                    self.unreadable += 1
                offset, partition = message.offset(), message.partition()
                if offset is not None and partition is not None:
                    self._positions[partition] = offset + 1

    def finish(self, timeout: float = 120.0) -> None:
        """Read up to the end offsets as they are now (call once the relay has stopped): every
        duplicate and phantom it wrote is then counted. The reading thread stops first: the
        consumer is used by one thread at a time."""
        self._stop.set()
        self._thread.join(30)
        try:
            ends = {}
            for partition in self._partitions:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=10, cached=False)
                ends[partition] = high
            deadline = time.monotonic() + timeout
            while self.error is None and any(self._positions[p] < e for p, e in ends.items()):
                if time.monotonic() > deadline:
                    self.error = f"reading {self.topic} back took more than {timeout:.0f} s"
                    break
                self._consume(0.5)
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
        finally:
            self._close_consumer()

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(30)
        self._close_consumer()

    def _close_consumer(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()

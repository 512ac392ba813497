"""Kafka helpers for tests: unique topics, and reading a topic back until a condition holds."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int

    @property
    def id(self) -> str:
        return self.headers["id"]


def unreachable_bootstrap() -> str:
    """An address where no broker listens (a port taken and freed again)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topics(
    bootstrap: str, *names: str, partitions: int = 1, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
         for name in names],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=60)
    # Wait until the metadata shows every partition with a leader, so the first produce works.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=10)
        ready = all(
            name in metadata.topics
            and len(metadata.topics[name].partitions) == partitions
            and all(p.leader >= 0 for p in metadata.topics[name].partitions.values())
            for name in names
        )
        if ready:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {names} have no leader after 30 s")


def raise_topic_limit(kafka: str, topic: str, limit: int) -> None:
    """Set the topic's max.message.bytes (the operator fixing the cause of parked events)."""
    admin = AdminClient({"bootstrap.servers": kafka})
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(limit),
                    incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def incompressible(size: int) -> str:
    """About `size` bytes of text that the producer's compression cannot shrink."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


class TopicReader:
    """Reads topics from the earliest offset; keeps everything it has seen."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.messages: list[Received] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        self._consumer.subscribe(list(topics))
        self._topics = topics

    def in_kafka(self) -> int:
        """How many messages the broker holds in these topics now (high watermarks): every
        message whose delivery Kafka has acknowledged is counted, read or not."""
        total = 0
        metadata = self._consumer.list_topics(timeout=10)
        for name in self._topics:
            for partition in metadata.topics[name].partitions:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(name, partition), timeout=10, cached=False)
                total += high
        return total

    def read_until(
        self, condition: Callable[[list[Received]], bool], timeout: float = 60.0
    ) -> list[Received]:
        """Consume until `condition(all messages so far)` holds; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not condition(self.messages):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met after {timeout:.0f}s; {len(self.messages)} messages read"
                )
            self._consume(0.5)
        return self.messages

    def read_ids(self, ids: set[str], timeout: float = 60.0) -> list[Received]:
        """Consume until every id in `ids` has been seen."""
        return self.read_until(lambda got: ids <= {m.id for m in got}, timeout)

    def drain(self, quiet: float = 2.0) -> list[Received]:
        """Consume until nothing new arrives for `quiet` seconds (used after the ids are all in,
        to catch duplicates and phantoms that would come after them)."""
        last = -1
        while last != len(self.messages):
            last = len(self.messages)
            self._consume(quiet)
        return self.messages

    def _consume(self, timeout: float) -> None:
        for message in self._consumer.consume(num_messages=10_000, timeout=timeout):
            if message.error():
                raise KafkaException(message.error())
            self.messages.append(
                Received(
                    topic=message.topic() or "",
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                    key=message.key().decode() if message.key() else None,
                    value=message.value() or b"",
                    headers={k: v.decode() for k, v in (message.headers() or [])},
                    timestamp_ms=message.timestamp()[1],
                )
            )

    def close(self) -> None:
        self._consumer.close()


@contextlib.contextmanager
def frozen(broker: Any) -> Iterator[None]:
    """A private broker (conftest's private_kafka) stopped with SIGSTOP until the block ends:
    connections stay open and nothing answers, as when a broker hangs."""
    pid = broker._running_pid()  # the service has no public freeze
    assert pid is not None, "the private broker is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)

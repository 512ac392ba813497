"""The consumer's configuration: one object with defaults, validated when it is made."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from outbox.consumer import dead_letters
from outbox.consumer.message import Message
from outbox.consumer.policy import RetryPolicy
from outbox.consumer.settings import (
    consumer_settings,
    max_poll_interval_seconds,
    producer_settings,
    valid_topic,
)
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames

CommitHook = Callable[[Sequence[Message]], None]
Ordering = Literal["none", "sequence"]

_NAME = re.compile(r"^[^\x00-\x1f]{1,200}$")


@dataclass(frozen=True)
class ConsumerConfig:
    """Everything a consumer needs besides its handlers and database.

    name: the dedup scope (rows of the inbox table) and the default Kafka `group.id`.
    kafka: librdkafka settings, passed through; `bootstrap.servers` is required; settings that
        would commit offsets behind the consumer's back, or run commands, are refused.
    batch_size: messages per database transaction (1 = one transaction per message).
    dead_letter_topic: where messages go after their last try; `{topic}` is the original one.
    dead_letter_kafka: settings only for the dead-letter producer.
    purge_older_than: when set, the runner deletes this consumer's dedup rows older than this,
        every `purge_every`. Keep it above the topics' retention: a row purged while its
        message can still be redelivered lets that message apply twice.
    on_commit: called after each database commit with the messages it applied, before their
        offsets are committed (metrics; tests use it to crash at the worst moment).
    pipeline: psycopg only: send each transaction's statements in pipeline mode, without
        waiting for each result (several times the throughput of one-row handlers). Handlers
        must then read results through fetch*() (`cursor.rowcount` is -1 until a fetch), and a
        failing statement surfaces later (at the commit at the latest); the consumer then
        halves the batch until the failing message is alone, so it is still the one retried.
    ordering: "sequence" checks the writers' per-aggregate numbers (Outbox(sequence=True), the
        `sequence` header) against the last one applied, kept in the transaction of the dedup
        rows: at or below it is a duplicate, the next is applied, beyond it is a gap: that
        aggregate's messages wait (others go on) up to `gap_timeout` seconds for the missing
        one, then are dead-lettered with reason `gap: ...` (outbox/consumer/sequencing.py).
        Messages without the header are applied as with "none" (the default).
    """

    name: str
    kafka: Mapping[str, Any]
    topics: Sequence[str]
    batch_size: int = 500
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dead_letter_topic: str = dead_letters.DEFAULT_TEMPLATE
    dead_letter_kafka: Mapping[str, Any] = field(default_factory=dict)
    dead_letter_timeout: float = 30.0
    allow_unsafe_kafka_settings: bool = False
    schema: str = "public"
    inbox_table: str = "outbox_inbox"
    validate_json: bool = True
    poll_timeout: float = 1.0
    purge_older_than: dt.timedelta | None = None
    purge_every: dt.timedelta = dt.timedelta(hours=1)
    on_commit: CommitHook | None = None
    pipeline: bool = False
    ordering: Ordering = "none"
    gap_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name) or not self.name.strip():
            raise ConfigurationError(
                f"name={self.name!r} must be a non-empty string of at most 200 printable "
                "characters (it is the dedup scope and the default group.id)"
            )
        if isinstance(self.topics, str):
            raise ConfigurationError("topics must be a list of topic names, not one string")
        if not self.topics:
            raise ConfigurationError("topics is empty: name at least one topic")
        for topic in self.topics:
            # librdkafka subscribes to a regular expression when the name starts with ^.
            if not isinstance(topic, str) or not (topic.startswith("^") or valid_topic(topic)):
                raise ConfigurationError(f"topic {topic!r} is not a valid Kafka topic name")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 100_000:
            raise ConfigurationError(f"batch_size={self.batch_size!r} must be in 1..100000")
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError("retry must be an outbox.consumer.RetryPolicy")
        dead_letters.check_template(self.dead_letter_topic)
        for topic in self.topics:
            if not topic.startswith("^") and dead_letters.topic_for(
                self.dead_letter_topic, topic
            ) == topic:
                raise ConfigurationError(
                    f"dead_letter_topic={self.dead_letter_topic!r} sends dead letters of "
                    f"{topic!r} back to {topic!r}"
                )
        if self.ordering not in ("none", "sequence"):
            raise ConfigurationError(f"ordering={self.ordering!r}: choose 'none' or 'sequence'")
        if (isinstance(self.gap_timeout, bool) or not isinstance(self.gap_timeout, int | float)
                or not 0 < self.gap_timeout < float("inf")):
            raise ConfigurationError(
                f"gap_timeout={self.gap_timeout!r} must be a positive number of seconds")
        if self.dead_letter_timeout <= 0 or self.poll_timeout <= 0:
            raise ConfigurationError("dead_letter_timeout and poll_timeout must be > 0 seconds")
        SchemaNames(schema=self.schema, inbox_table=self.inbox_table)
        if self.purge_older_than is not None and self.purge_older_than <= dt.timedelta(0):
            raise ConfigurationError("purge_older_than must be a positive duration")
        if self.purge_every <= dt.timedelta(0):
            raise ConfigurationError("purge_every must be a positive duration")
        settings = self.consumer_settings()
        self.producer_settings()
        # A message waiting between its tries does not poll Kafka; past max.poll.interval.ms the
        # broker would hand its partition to another consumer mid-retry.
        limit = max_poll_interval_seconds(settings)
        if self.retry.longest_wait() >= limit:
            raise ConfigurationError(
                f"retry waits up to {self.retry.longest_wait():.0f}s between the tries of one "
                f"message, longer than max.poll.interval.ms ({limit:.0f}s): lower retry tries "
                "or max_delay, or raise max.poll.interval.ms"
            )

    @property
    def names(self) -> SchemaNames:
        return SchemaNames(schema=self.schema, inbox_table=self.inbox_table)

    def consumer_settings(self) -> dict[str, Any]:
        return consumer_settings(
            self.name, self.kafka, allow_unsafe=self.allow_unsafe_kafka_settings
        )

    def producer_settings(self) -> dict[str, Any]:
        return producer_settings(
            self.consumer_settings(),
            self.dead_letter_kafka,
            allow_unsafe=self.allow_unsafe_kafka_settings,
        )


class ConsumerOptions(TypedDict, total=False):
    """The optional keyword arguments of `Consumer` and `AsyncConsumer` (see ConsumerConfig)."""

    batch_size: int
    retry: RetryPolicy
    dead_letter_topic: str
    dead_letter_kafka: Mapping[str, Any]
    dead_letter_timeout: float
    allow_unsafe_kafka_settings: bool
    schema: str
    inbox_table: str
    validate_json: bool
    poll_timeout: float
    purge_older_than: dt.timedelta | None
    purge_every: dt.timedelta
    on_commit: CommitHook | None
    pipeline: bool
    ordering: Ordering
    gap_timeout: float

"""Publishes outbox records to Kafka with confluent-kafka and reports each delivery."""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from outbox.errors import ConfigurationError, OutboxError
from outbox.record import OutboxRecord
from relay.kafka_settings import producer_settings, valid_topic

log = logging.getLogger(__name__)

Token = TypeVar("Token")

# Delivery errors that no retry can cure: the event is parked, other aggregates go on.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
    }
)

TEMPLATE_FIELDS = ("aggregate_type", "aggregate_id", "event_type")
DEFAULT_TOPIC_TEMPLATE = "{aggregate_type}"
RESERVED_HEADERS = ("id", "event_type", "aggregate_type", "content_type")
# Topic names checked per publisher; templates over aggregate ids could make many.
_MAX_TOPICS_REMEMBERED = 4096


class PublishError(OutboxError):
    """Kafka refused or failed to deliver an event."""


class Delivery(NamedTuple):
    """The outcome of one send: `error` is None on success; `permanent` errors are for parking.

    A named tuple: one is made per event on the hot path, where a frozen dataclass costs more.
    """

    record: OutboxRecord
    topic: str
    error: str | None = None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PublisherConfig:
    bootstrap_servers: str
    topic_template: str = "{aggregate_type}"
    kafka_settings: Mapping[str, str] = field(default_factory=dict)
    allow_unsafe_kafka_settings: bool = False

    def __post_init__(self) -> None:
        check_topic_template(self.topic_template)

    def producer_settings(self) -> dict[str, str]:
        return producer_settings(
            self.bootstrap_servers,
            self.kafka_settings,
            allow_unsafe=self.allow_unsafe_kafka_settings,
        )


def check_topic_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigurationError(f"topic_template={template!r} is malformed: {exc}") from exc
    unknown = fields - set(TEMPLATE_FIELDS)
    if unknown:
        raise ConfigurationError(
            f"topic_template={template!r} uses {sorted(unknown)}; "
            f"it may use only {{{'}, {'.join(TEMPLATE_FIELDS)}}}"
        )


def topic_for(record: OutboxRecord, template: str) -> str:
    if record.topic:
        return record.topic
    if template == DEFAULT_TOPIC_TEMPLATE:
        return record.aggregate_type
    return template.format(
        aggregate_type=record.aggregate_type,
        aggregate_id=record.aggregate_id,
        event_type=record.event_type,
    )


def kafka_headers(record: OutboxRecord) -> list[tuple[str, str | bytes | None]]:
    # str values: librdkafka's binding encodes them to UTF-8 in C, cheaper than .encode() here.
    headers: list[tuple[str, str | bytes | None]] = [
        ("id", str(record.id)),
        ("event_type", record.event_type),
        ("aggregate_type", record.aggregate_type),
        ("content_type", record.content_type),
    ]
    if record.headers:
        headers += [
            (key, value) for key, value in record.headers.items() if key not in RESERVED_HEADERS
        ]
    return headers


class KafkaPublisher(Generic[Token]):
    """Sends records; `on_delivery(token, delivery)` is called from `poll`/`flush` for each.

    `send` never raises for a single bad event: a permanent failure (invalid topic, too large)
    is reported through `on_delivery` like any other outcome. With `on_delivered`, successes
    go there instead, as (token, topic): the cheapest report, once per event. A full local queue is
    backpressure: `send` serves delivery reports until there is room, calling `on_wait` between
    polls so that the source stays alive meanwhile (replication status updates, the MongoDB
    lease).
    """

    def __init__(
        self,
        config: PublisherConfig,
        on_delivery: Callable[[Token, Delivery], None],
        *,
        on_delivered: Callable[[Token, str], None] | None = None,
        on_broker_state: Callable[[bool], None] | None = None,
        on_wait: Callable[[], None] | None = None,
        producer: Producer | None = None,
    ) -> None:
        self.config = config
        self._on_delivery = on_delivery
        # Successes, as (token, topic), for a caller that wants no Delivery object per event.
        self._on_delivered = on_delivered
        self._on_broker_state = on_broker_state or (lambda _up: None)
        # Called while `send` waits for room in a full local queue (the broker slow or away).
        self.on_wait: Callable[[], None] = on_wait or (lambda: None)
        self._producer = producer or Producer(
            # librdkafka's own log lines go through Python logging (structured, redacted).
            {**config.producer_settings(), "error_cb": self._on_client_error,
             "logger": logging.getLogger("relay.librdkafka")}
        )
        self.in_flight = 0
        self._default_topics = config.topic_template == DEFAULT_TOPIC_TEMPLATE
        self._valid_topics: dict[str, bool] = {}

    def _on_client_error(self, error: KafkaError) -> None:
        # Transport errors (broker down) are retried by librdkafka; log them, mark not ready.
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._on_broker_state(False)
        if error.fatal():
            log.error("kafka fatal error", extra={"event": "kafka_fatal", "error": str(error)})
        else:
            log.warning("kafka client error", extra={"event": "kafka_error", "error": str(error)})

    def send(self, record: OutboxRecord, token: Token) -> None:
        # Once per event: local names, a dict for the topic check, one closure.
        topic = record.topic or (
            record.aggregate_type if self._default_topics
            else topic_for(record, self.config.topic_template)
        )
        valid = self._valid_topics.get(topic)
        if valid is None:
            valid = self._remember_topic(topic)
        if not valid:
            self._on_delivery(
                token,
                Delivery(record, topic, f"invalid topic name {topic!r}", permanent=True),
            )
            return

        on_delivery, on_delivered = self._on_delivery, self._on_delivered

        def delivered(error: KafkaError | None, _message: Message) -> None:
            self.in_flight -= 1
            if error is not None:
                on_delivery(token, Delivery(
                    record, topic, str(error), permanent=error.code() in PERMANENT_ERRORS))
            elif on_delivered is not None:
                on_delivered(token, topic)
            else:
                on_delivery(token, Delivery(record, topic))

        produce = self._producer.produce
        while True:
            try:
                produce(
                    topic,
                    record.payload,
                    record.aggregate_id,  # a str: the binding encodes it to UTF-8 in C
                    headers=kafka_headers(record),
                    on_delivery=delivered,
                )
                self.in_flight += 1
                return
            except BufferError:
                # The local queue is full (broker slow or away): wait for deliveries.
                self._producer.poll(0.1)
                self.on_wait()
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                code = error.code() if isinstance(error, KafkaError) else None
                self._on_delivery(
                    token,
                    Delivery(record, topic, str(exc), permanent=code in PERMANENT_ERRORS),
                )
                return

    def _remember_topic(self, topic: str) -> bool:
        if len(self._valid_topics) >= _MAX_TOPICS_REMEMBERED:
            self._valid_topics.clear()
        valid = self._valid_topics[topic] = valid_topic(topic)
        return valid

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports, waiting up to `timeout` seconds for the first."""
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float) -> int:
        """Wait until every sent record has a delivery report; returns how many are still out."""
        return int(self._producer.flush(timeout))

    def purge(self) -> None:
        """Drop what librdkafka still holds (their reports come as failures on the next poll)."""
        self._producer.purge()
        self._producer.poll(0)

    def broker_reachable(self, timeout: float) -> bool:
        """Ask the broker for metadata; reports the answer to `on_broker_state` too."""
        try:
            self._producer.list_topics(timeout=timeout)
            up = True
        except KafkaException:
            up = False
        self._on_broker_state(up)
        return up

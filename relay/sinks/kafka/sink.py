"""The Kafka sink (relay/core/ports.py `Sink`): publishes outbox records with confluent-kafka and
reports each delivery; which Kafka errors are permanent is decided here."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import string
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from psycopg import sql

import relay.native
from outbox import commands
from outbox.columns import ColumnMapping
from outbox.contracts.registry import VERSION_HEADER
from outbox.errors import ConfigurationError
from outbox.record import OutboxRecord
from outbox.sequences import SEQUENCE_HEADER
from outbox.tracing import TRACE_HEADERS
from relay.core.holds import KeyHolds
from relay.core.ports import Delivery, OnDelivered, OnDelivery, Sink, SinkFactory
from relay.sinks.kafka.settings import admin_settings, batch_limit, producer_settings, valid_topic
from relay.sinks.kafka.topic_limits import HEADROOM_BYTES, TopicLimit, TopicLimits, kafka_describe
from relay.stats import RelayStats

log = logging.getLogger(__name__)

Token = TypeVar("Token")

# Delivery errors that no retry can cure: the event is parked (its key held behind it), other
# keys go on. A topic that does not exist and cannot be created (auto-creation off, or a name
# colliding with another) or that the relay may not write to parks its events too, with the
# reason: the relay does not restart in a loop over it, and `outbox parked retry` sends them once
# the topic or the grant is there. (With message.timeout.ms=0 librdkafka retries a missing
# topic's messages until topic.metadata.propagation.max.ms, 30 s, then reports it for good.)
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)
# Refusals for size: the event's own fault only when it was sent alone (see topic_limits).
SIZE_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
    }
)

TEMPLATE_FIELDS = ("aggregate_type", "aggregate_id", "event_type")
DEFAULT_TOPIC_TEMPLATE = "{aggregate_type}"
RESERVED_HEADERS = ("id", "event_type", "aggregate_type", "content_type")
# Headers that the writer, the consumer or replay give a meaning to: a relay id header of one of
# these names would follow the event's own and could be read in its place (the last one wins).
TOOLKIT_HEADERS = frozenset({
    SEQUENCE_HEADER, VERSION_HEADER, *TRACE_HEADERS, commands.MESSAGE_TYPE, commands.COMMAND_TYPE,
    commands.REPLY_TO, commands.CORRELATION_ID, commands.REPLY_OUTCOME, commands.FAILURE_REASON,
    "replayed"})  # relay/replay.py's header
DEAD_LETTER_PREFIX = "dlq."  # outbox/consumer/dead_letters.py
# Topic names checked per publisher; templates over aggregate ids could make many.
_MAX_TOPICS_REMEMBERED = 4096
_UNSEEN: Any = object()
# Seconds between fresh looks at the topics' limits (see `poll`).
TOPICS_RECHECK = 10.0


@dataclass(frozen=True)
class PublisherConfig:
    bootstrap_servers: str
    topic_template: str = "{aggregate_type}"
    kafka_settings: Mapping[str, str] = field(default_factory=dict)
    allow_unsafe_kafka_settings: bool = False
    # A header naming the relay run that published each message (see `relay_run_id`).
    relay_id_header: str | None = None

    def __post_init__(self) -> None:
        check_topic_template(self.topic_template)
        header = self.relay_id_header
        if header is not None and (not header or header in RESERVED_HEADERS):
            raise ConfigurationError(
                f"relay_id_header={header!r}: give a header name other than "
                f"{', '.join(sorted(RESERVED_HEADERS))}")
        if header is not None and (header in TOOLKIT_HEADERS
                                   or header.startswith(DEAD_LETTER_PREFIX)):
            raise ConfigurationError(
                f"relay_id_header={header!r}: the toolkit's own header of that name would be "
                "read as the relay run's; give another name (e.g. outbox-relay)")

    def producer_settings(self) -> dict[str, str]:
        return producer_settings(
            self.bootstrap_servers,
            self.kafka_settings,
            allow_unsafe=self.allow_unsafe_kafka_settings,
        )


def topic_limits_for(config: PublisherConfig) -> TopicLimits:
    """The limits of the topics `config`'s producer writes to, read from the brokers."""
    producer = config.producer_settings()
    return TopicLimits(kafka_describe(admin_settings(producer, config.kafka_settings)),
                       batch_limit(producer))


def new_producer(settings: Mapping[str, Any]) -> Producer:
    """A librdkafka producer. librdkafka checks setting names and values only here: one it does
    not know or refuses (`--kafka-setting linger.ms=soon`) is a ConfigurationError naming it,
    raised before anything is sent, not a traceback."""
    try:
        return Producer(dict(settings))
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        reason = error.str() if isinstance(error, KafkaError) else str(exc)
        raise ConfigurationError(f"kafka settings: {reason}") from None


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


def topic_sql(template: str, columns: ColumnMapping) -> sql.Composable | None:
    """`topic_for` as an SQL expression over a row of `columns`' table: the topic the relay
    sends the row's event to, which a relay keeping published rows stores in them (relay/
    published.py `kept_topic`) so that `outbox replay` sends where the event went even after
    the template changed. None when the table has no topic column to store it in (Debezium's
    layout), or when the template converts or formats a field (`{aggregate_id!r}`,
    `{event_type:.3}`), which SQL would not mirror exactly: replay then resolves the topic
    with its own --topic-template, as for rows kept before. Composed once, at start-up."""
    if columns.topic is None:
        return None
    parts: list[sql.Composable] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(sql.Literal(literal))
        if name is None:
            continue
        if spec or conversion not in (None, "s") or name not in TEMPLATE_FIELDS:
            return None
        parts.append(sql.Identifier(getattr(columns, name)))
    if not parts:
        return None
    # The row's own topic wins, as in topic_for (an empty one does not).
    resolved = parts[0] if len(parts) == 1 else sql.SQL("concat({})").format(
        sql.SQL(", ").join(parts))
    return sql.SQL("coalesce(nullif({topic}, ''), {resolved})").format(
        topic=sql.Identifier(columns.topic), resolved=resolved)


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


def header_builder() -> Callable[[OutboxRecord], list[tuple[str, str | bytes | None]]]:
    """`kafka_headers`, compiled when `make native` built relay/_native (the same list, about a
    microsecond less per event: most of it `str(uuid)`); else `kafka_headers` itself."""
    native = relay.native.module
    if native is None:
        return kafka_headers
    fields = tuple(OutboxRecord._fields.index(name) for name in (*RESERVED_HEADERS, "headers"))
    return cast(Callable[[OutboxRecord], list[tuple[str, str | bytes | None]]],
                native.HeaderBuilder(uuid.UUID, fields))


class KafkaSink(Generic[Token]):
    """Sends records; `on_delivery(token, delivery)` is called from `poll`/`flush` for each.

    `send` never raises for a single bad event: a permanent failure (invalid topic, too large)
    is reported through `on_delivery` like any other outcome, and holds the event's key: later
    events of the key are reported as permanent failures too ("held behind <id>", see
    relay.core.holds), so that the key's order survives the parking. With `on_delivered`, successes
    go there instead, as (token, topic): the cheapest report, once per event.

    `send` waits, serving delivery reports and calling `on_wait` between polls so that the
    source stays alive meanwhile (replication status updates, the MongoDB lease): while the
    local queue is full (backpressure), and where an event must travel alone or a topic's batches
    be kept under its own size limit (relay.sinks.kafka.topic_limits).
    """

    def __init__(
        self,
        config: PublisherConfig,
        on_delivery: Callable[[Token, Delivery], None],
        *,
        on_delivered: Callable[[Token, str], None] | None = None,
        on_broker_state: Callable[[bool], None] | None = None,
        on_wait: Callable[[], None] | None = None,
        holds: KeyHolds | None = None,
        limits: TopicLimits | None = None,
        producer: Producer | None = None,
        relay_id: str | None = None,
    ) -> None:
        self.config = config
        # The relay run's header (config.relay_id_header), appended to every message's.
        self._relay_header: list[tuple[str, str | bytes | None]] = (
            [(config.relay_id_header, relay_id)]
            if config.relay_id_header and relay_id else [])
        self._on_delivery = on_delivery
        # Successes, as (token, topic), for a caller that wants no Delivery object per event.
        self._on_delivered = on_delivered
        self._on_broker_state = on_broker_state or (lambda _up: None)
        # Called while `send` waits (the local queue full, an event travelling alone).
        self.on_wait: Callable[[], None] = on_wait or (lambda: None)
        self.holds = holds if holds is not None else KeyHolds()
        self.limits = limits if limits is not None else topic_limits_for(config)
        self._producer = producer or new_producer(
            # librdkafka's own log lines go through Python logging (structured, redacted).
            {**config.producer_settings(), "error_cb": self._on_client_error,
             "logger": logging.getLogger("relay.librdkafka")}
        )
        self.in_flight = 0
        self._headers = header_builder()
        self._default_topics = config.topic_template == DEFAULT_TOPIC_TEMPLATE
        # topic -> its limits, or None for a name Kafka would refuse
        self._topics: dict[str, TopicLimit | None] = {}
        self._topics_checked = time.monotonic()
        self._alone_in_flight = 0  # an event travelling alone: nothing is sent until answered
        self._topic_bytes: dict[str, int] = {}  # in flight to topics with a budget

    def _on_client_error(self, error: KafkaError) -> None:
        # Transport errors are retried by librdkafka; all logged. Only "all brokers down" marks
        # the relay not ready: a _TRANSPORT error is one connection (of several) failing while
        # deliveries may go on, and readiness must not flap with it during a drain (seen in CI).
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._on_broker_state(False)
        if error.fatal():
            log.error("kafka fatal error", extra={"event": "kafka_fatal", "error": str(error)})
        else:
            log.warning("kafka client error", extra={"event": "kafka_error", "error": str(error)})

    def _refuse(self, token: Token, delivery: Delivery) -> None:
        """Report a permanent refusal; the event's key is held behind it from now on."""
        self.holds.parked(delivery.record)
        self._on_delivery(token, delivery)

    def send(self, record: OutboxRecord, token: Token) -> None:
        # Once per event: local names, one dict lookup for the topic, one closure.
        topic = record.topic or (
            record.aggregate_type if self._default_topics
            else topic_for(record, self.config.topic_template)
        )
        limit = self._topics.get(topic, _UNSEEN)
        if limit is _UNSEEN:
            limit = self._learn(topic)
        if limit is None:
            self._refuse(token, Delivery(
                record, topic, f"invalid topic name {topic!r}", permanent=True))
            return
        size = len(record.payload) + len(record.aggregate_id)
        alone = size >= limit.alone_from
        budgeted = 0
        if self._alone_in_flight or alone:
            self._wait_until(lambda: self.in_flight == 0)
        if limit.budget is not None:
            budgeted = size + HEADROOM_BYTES
            self._wait_until(lambda: self._fits(topic, budgeted, limit.budget))
        if self.holds.behind:
            reason = self.holds.reason_to_park(record)
            if reason is not None:
                self._refuse(token, Delivery(record, topic, reason, permanent=True))
                return

        on_delivery, on_delivered = self._on_delivery, self._on_delivered

        def delivered(error: KafkaError | None, _message: Message) -> None:
            self.in_flight -= 1
            if alone:
                self._alone_in_flight -= 1
            if budgeted:
                self._topic_bytes[topic] -= budgeted
            if error is not None:
                self._failed(token, record, topic, error, alone=alone)
            elif on_delivered is not None:
                on_delivered(token, topic)
            else:
                on_delivery(token, Delivery(record, topic))

        produce, headers = self._producer.produce, self._headers(record)
        if self._relay_header:
            headers += self._relay_header
        while True:
            try:
                produce(
                    topic,
                    record.payload,
                    record.aggregate_id,  # a str: the binding encodes it to UTF-8 in C
                    headers=headers,
                    on_delivery=delivered,
                )
                self.in_flight += 1
                if alone:
                    self._alone_in_flight += 1
                if budgeted:
                    self._topic_bytes[topic] = self._topic_bytes.get(topic, 0) + budgeted
                return
            except BufferError:
                # The local queue is full (broker slow or away): wait for deliveries.
                self._producer.poll(0.1)
                self.on_wait()
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                code = error.code() if isinstance(error, KafkaError) else None
                # Refused before sending (larger than the producer's message.max.bytes): by
                # itself, so a size error is permanent here.
                delivery = Delivery(record, topic, str(exc),
                                    permanent=code in PERMANENT_ERRORS or code in SIZE_ERRORS)
                if delivery.permanent:
                    self._refuse(token, delivery)
                else:
                    self._on_delivery(token, delivery)
                return

    def _failed(
        self, token: Token, record: OutboxRecord, topic: str, error: KafkaError, *, alone: bool
    ) -> None:
        code = error.code()
        if code in SIZE_ERRORS and not alone:
            # Refused with its batch: not this event's fault. The run fails (sent again, in
            # order, after the restart), and the topic's events go alone from now on.
            self.limits.refused_in_batch(topic)
            self._topics.pop(topic, None)
            self._on_delivery(token, Delivery(
                record, topic, f"{error} (a batch too large for the topic; sent again alone)"))
        elif code in PERMANENT_ERRORS or code in SIZE_ERRORS:
            self._refuse(token, Delivery(record, topic, str(error), permanent=True))
        else:
            self._on_delivery(token, Delivery(record, topic, str(error)))

    def _fits(self, topic: str, size: int, budget: int) -> bool:
        in_flight = self._topic_bytes.get(topic, 0)
        return in_flight == 0 or in_flight + size <= budget

    def _wait_until(self, condition: Callable[[], bool]) -> None:
        """Serve delivery reports until `condition` holds (each report may change it)."""
        while not condition():
            self._producer.poll(0.1)
            self.on_wait()

    def _learn(self, topic: str) -> TopicLimit | None:
        if len(self._topics) >= _MAX_TOPICS_REMEMBERED:
            self._topics.clear()
        limit = self._topics[topic] = self.limits.of(topic) if valid_topic(topic) else None
        return limit

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports, waiting up to `timeout` seconds for the first."""
        if self._topics and time.monotonic() >= self._topics_checked + TOPICS_RECHECK:
            # Limits are looked up again now and then (an operator may change them); here, not
            # per event. TopicLimits asks the brokers only once its own entry expires.
            self._topics.clear()
            self._topics_checked = time.monotonic()
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


_RUNS = itertools.count(1)


def relay_run_id() -> str:
    """`host:pid:run`: which relay process published a message, and in which of its runs (a
    run starts at each restart, and for a sharded relay at each claim of its shards)."""
    return f"{socket.gethostname()}:{os.getpid()}:{next(_RUNS)}"


def kafka_sink(
    config: PublisherConfig, stats: RelayStats, limits: TopicLimits | None = None
) -> SinkFactory:
    """What the relay core builds its Kafka sink with, at each run. `limits` (what the topics
    accept, which need their events sent alone) are kept across the relay's restarts: the
    daemon makes them once per source (relay/<source>/factory.py)."""
    limits = limits or topic_limits_for(config)

    def make(on_delivery: OnDelivery, on_delivered: OnDelivered | None) -> Sink[Any]:
        return KafkaSink[Any](
            config, on_delivery, on_delivered=on_delivered, limits=limits,
            on_broker_state=lambda up: setattr(stats, "broker_connected", up),
            relay_id=relay_run_id() if config.relay_id_header else None)

    return make

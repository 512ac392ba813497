"""librdkafka settings of the consumer and its dead-letter producer: defaults, refused keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from outbox.errors import ConfigurationError
from outbox.kafka_safety import refuse_unsafe

# The exactly-once rule rests on these: an offset is committed by the consumer itself, and only
# after the database transaction of its message committed.
REQUIRED = {
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    # A new consumer group starts from the beginning: an outbox topic holds events it must apply.
    "auto.offset.reset": "earliest",
    "enable.partition.eof": "false",
    "isolation.level": "read_committed",
    "client.id": "outbox-consumer",
}

# Keys that only a consumer understands; the dead-letter producer gets the others (bootstrap,
# TLS, SASL, client.id, ...), so one `kafka=` mapping configures both.
_CONSUMER_ONLY = frozenset(
    {
        "group.id",
        "group.instance.id",
        "group.protocol",
        "group.protocol.type",
        "group.remote.assignor",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "auto.offset.reset",
        "auto.commit.interval.ms",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "enable.partition.eof",
        "isolation.level",
        "check.crcs",
        "consume.callback.max.messages",
        "allow.auto.create.topics",
        "offset.store.method",
    }
)
_CONSUMER_ONLY_PREFIXES = ("fetch.", "queued.", "coordinator.")

DEAD_LETTER_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": "true",
    "acks": "all",
    "linger.ms": "5",
    # A dead letter that cannot be delivered in this time is retried by the consumer (with
    # backoff) rather than forever inside librdkafka, so that stop() is served.
    "message.timeout.ms": "30000",
    "client.id": "outbox-consumer-dlq",
}

DEFAULT_MAX_POLL_INTERVAL_MS = 300_000

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def valid_topic(name: str) -> bool:
    """Kafka's rule for topic names (`.` and `..` are reserved)."""
    return bool(_TOPIC.match(name)) and name not in (".", "..")


def _flag(value: Any) -> str:
    return str(value).strip().lower()


def consumer_settings(
    group_id: str, kafka: Mapping[str, Any], *, allow_unsafe: bool = False
) -> dict[str, Any]:
    """The consumer configuration, validated; raises ConfigurationError naming the bad key."""
    settings = dict(CONSUMER_DEFAULTS)
    settings["group.id"] = group_id
    for raw_key, value in kafka.items():
        key = raw_key.strip()
        refuse_unsafe(key, allow_unsafe=allow_unsafe)
        if key in REQUIRED and _flag(value) != REQUIRED[key]:
            raise ConfigurationError(
                f"kafka setting {key}={value!r} would commit offsets of messages whose "
                f"transaction has not committed; it must be {REQUIRED[key]!r}"
            )
        settings[key] = value
    if not str(settings.get("bootstrap.servers", "")).strip():
        raise ConfigurationError("kafka setting 'bootstrap.servers' is missing or empty")
    if not str(settings["group.id"]).strip():
        raise ConfigurationError("kafka setting 'group.id' is empty")
    settings.update(REQUIRED)
    return settings


def producer_settings(
    kafka: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    allow_unsafe: bool = False,
) -> dict[str, Any]:
    """The dead-letter producer's configuration: the consumer's connection settings (TLS, SASL,
    ...) without the consumer-only keys, plus `overrides`. `kafka` must already be validated."""
    settings = dict(DEAD_LETTER_PRODUCER_DEFAULTS)
    for key, value in kafka.items():
        if key in _CONSUMER_ONLY or key.startswith(_CONSUMER_ONLY_PREFIXES) or key == "client.id":
            continue
        settings[key] = value
    for raw_key, value in (overrides or {}).items():
        key = raw_key.strip()
        refuse_unsafe(key, allow_unsafe=allow_unsafe)
        settings[key] = value
    return settings


def max_poll_interval_seconds(settings: Mapping[str, Any]) -> float:
    raw = settings.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS)
    try:
        return int(raw) / 1000
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"kafka setting max.poll.interval.ms={raw!r} is not a number of milliseconds"
        ) from exc

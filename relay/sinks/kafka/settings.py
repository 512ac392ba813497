"""librdkafka producer settings: safe defaults for the relay, pass-through, and refused keys."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from outbox.errors import ConfigurationError
from outbox.kafka_safety import refuse_unsafe

# The relay's guarantees rest on these: a user may not weaken them by pass-through.
REQUIRED = {
    "enable.idempotence": "true",  # retries never duplicate or reorder within a partition
    "acks": "all",
}

DEFAULTS = {
    # 0 = retry forever: a broker outage stalls the relay (backpressure) rather than failing
    # messages, so per-key order survives and nothing is acknowledged without a delivery.
    "message.timeout.ms": "0",
    # A short wait to fill batches: under load they fill anyway, and at low rates each
    # millisecond here is a millisecond of commit-to-Kafka latency.
    "linger.ms": "1",
    # Room for the writer's largest payload (Outbox.max_payload_bytes, 1 MiB by default) plus
    # key, headers and record overhead; the broker's message.max.bytes must allow it too
    # (`outbox doctor` checks).
    "message.max.bytes": "1200000",
    "batch.num.messages": "10000",
    "queue.buffering.max.messages": "200000",
    # Bounds the relay's memory while the broker is away (BufferError means: wait).
    "queue.buffering.max.kbytes": "65536",
    "compression.type": "lz4",
    "socket.keepalive.enable": "true",
    "client.id": "outbox-relay",
}


def producer_settings(
    bootstrap_servers: str,
    overrides: Mapping[str, str] | None = None,
    *,
    allow_unsafe: bool = False,
) -> dict[str, str]:
    """The producer configuration, validated; raises ConfigurationError naming the bad key."""
    if not bootstrap_servers or not bootstrap_servers.strip():
        raise ConfigurationError(
            "kafka bootstrap servers are empty (--kafka / OUTBOX_KAFKA_BOOTSTRAP)"
        )
    settings = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        key = key.strip()
        refuse_unsafe(key, allow_unsafe=allow_unsafe)
        if key in REQUIRED and str(value).lower() != REQUIRED[key]:
            raise ConfigurationError(
                f"kafka setting {key}={value!r} would break the relay's guarantees; "
                f"it must be {REQUIRED[key]!r}"
            )
        if key == "bootstrap.servers":
            raise ConfigurationError("set bootstrap servers with --kafka, not as a kafka setting")
        settings[key] = str(value)
    settings.update(REQUIRED)
    settings["bootstrap.servers"] = bootstrap_servers
    return settings


# librdkafka's defaults where the relay sets none.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
LIBRDKAFKA_BATCH_SIZE = 1_000_000


def admin_settings(producer: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, Any]:
    """An admin client's settings from the relay's producer settings: connection and security
    only. The producer's guarantees mean nothing to an admin client (and idempotence would make
    it ask for a producer id)."""
    config: dict[str, Any] = {
        key: value for key, value in producer.items()
        if (key in ("bootstrap.servers", "client.id") or key in overrides)
        and key not in REQUIRED
    }
    return config


def batch_limit(producer: Mapping[str, str]) -> int:
    """The most bytes librdkafka puts in one produce batch (a larger event goes alone)."""
    return min(int(producer.get("batch.size", LIBRDKAFKA_BATCH_SIZE)),
               int(producer.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)))


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@functools.lru_cache(maxsize=4096)
def valid_topic(name: str) -> bool:
    """Kafka's rule for topic names (`.` and `..` are reserved)."""
    return bool(_TOPIC.match(name)) and name not in (".", "..")

"""What each topic accepts, so that Kafka refuses an event only for its own size, never for the
size of the batch it travelled in, and never after later events of its key were delivered.

A topic's own `max.message.bytes` applies to a whole producer batch. librdkafka fills batches up
to its `batch.size` whatever the topic's limit, so on a topic with a smaller limit the broker
refuses whole batches of small events. And when it refuses one batch, later batches of the same
partition may already be on their way and be delivered: a parked event would then fall behind
the next events of its key. The publisher therefore:

- sends an event whose size comes near the topic's limit *alone*: after every earlier event was
  answered, and before any later one is sent. If Kafka refuses it, it is too large by itself
  (it is parked, and its key held); if not, nothing else was held up for long.
- keeps the bytes in flight to a topic whose limit is below the batch size under that limit
  (`budget`), so none of its batches can exceed it.

A size refusal of an event that was *not* sent alone is not the event's fault: the topic's limit
changed or could not be read. It fails the run (the relay restarts from what Kafka
acknowledged, and sends again in order), and from then on every event of that topic goes
alone. The limits are kept by the relay across its restarts, and read again after a while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

log = logging.getLogger(__name__)

# Bytes of an event besides its payload and key counted as room: the headers (id, event_type,
# aggregate_type, content_type, traceparent and typical own headers) and the record framing.
HEADROOM_BYTES = 4096
# How long a topic's limit is trusted before it is read again (an operator may raise it).
KNOWN_TTL = 300.0
UNKNOWN_TTL = 60.0

Describe = Callable[[str], int | None]
# Answers about one topic (others may be readable): not a reason to stop asking for a while.
_TOPIC_ERRORS = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED})


@dataclass(frozen=True, slots=True)
class TopicLimit:
    """alone_from: events at least this large (payload and key) are sent alone.
    budget: at most this many bytes in flight to the topic; None: no bound below the batch size.
    """

    alone_from: int
    budget: int | None
    expires: float


class TopicLimits:
    """Topic -> TopicLimit, read with `describe` (a topic's max.message.bytes, None if it
    cannot be read) and remembered."""

    def __init__(self, describe: Describe, batch_bytes: int) -> None:
        self._describe = describe
        self._batch_bytes = batch_bytes
        self._limits: dict[str, TopicLimit] = {}
        # Topics where a batch was refused although its events were not sent alone.
        self._all_alone: set[str] = set()

    def of(self, topic: str, now: float | None = None) -> TopicLimit:
        now = time.monotonic() if now is None else now
        limit = self._limits.get(topic)
        if limit is None or limit.expires <= now:
            limit = self._limits[topic] = self._read(topic, now)
        return limit

    def _read(self, topic: str, now: float) -> TopicLimit:
        if topic in self._all_alone:
            return TopicLimit(0, None, now + KNOWN_TTL)
        accepted = self._describe(topic)
        if accepted is None:
            # Unknown (a topic yet to be created, or no right to read its configuration):
            # assume it takes a full batch; a refusal then makes its events go alone.
            return TopicLimit(self._batch_bytes - HEADROOM_BYTES, None, now + UNKNOWN_TTL)
        room = max(0, accepted - HEADROOM_BYTES)
        budget = room if accepted < self._batch_bytes else None
        return TopicLimit(min(room, self._batch_bytes - HEADROOM_BYTES), budget, now + KNOWN_TTL)

    def refused_in_batch(self, topic: str) -> None:
        """Kafka refused a batch of `topic` for its size that held events not sent alone."""
        if topic not in self._all_alone:
            log.warning("kafka refused a batch for its size; events of this topic now go alone",
                        extra={"event": "topic_batches_refused", "topic": topic})
        self._all_alone.add(topic)
        self._limits.pop(topic, None)


def kafka_describe(admin_config: dict[str, Any], timeout: float = 2.0) -> Describe:
    """Reads a topic's `max.message.bytes` with an admin client made on first use. While the
    brokers do not answer, topics are not asked about again for a while: each question would
    hold `send` up for `timeout`."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not re-exported
        AdminClient,
        ConfigResource,
        ResourceType,
    )

    admin: list[Any] = []
    quiet_until = [0.0]

    def describe(topic: str) -> int | None:
        if time.monotonic() < quiet_until[0]:
            return None
        if not admin:
            settings: dict[str, Any] = {
                **admin_config, "logger": logging.getLogger("relay.librdkafka")}
            admin.append(AdminClient(settings))
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            futures = admin[0].describe_configs([resource], request_timeout=timeout)
            entries = futures[resource].result(timeout=timeout)
        except Exception as exc:  # KafkaException, or no answer in time: the limit is unknown
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if not (isinstance(error, KafkaError) and error.code() in _TOPIC_ERRORS):
                quiet_until[0] = time.monotonic() + UNKNOWN_TTL / 6  # the brokers, not the topic
            log.debug("topic limit unknown", extra={
                "event": "topic_limit_unknown", "topic": topic, "error": str(exc)})
            return None
        entry = entries.get("max.message.bytes")
        return int(entry.value) if entry is not None and entry.value is not None else None

    return describe

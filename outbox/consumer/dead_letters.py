"""Dead letters: the topic they go to and the headers that let `outbox dlq replay` undo them."""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Sequence

from outbox.consumer.message import RawHeaders, Received
from outbox.consumer.settings import valid_topic
from outbox.errors import ConfigurationError

DEFAULT_TEMPLATE = "{topic}.dlq"
HEADER_PREFIX = "dlq."
ORIGINAL_TOPIC = "dlq.original_topic"
ORIGINAL_PARTITION = "dlq.original_partition"
ORIGINAL_OFFSET = "dlq.original_offset"
CONSUMER = "dlq.consumer"
ERROR = "dlq.error"
ATTEMPTS = "dlq.attempts"
DEAD_LETTERED_AT = "dlq.dead_lettered_at"

OutHeaders = list[tuple[str, bytes | None]]


def check_template(template: str) -> None:
    """A dead-letter topic template may use `{topic}` only."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigurationError(f"dead_letter_topic={template!r} is malformed: {exc}") from exc
    if fields - {"topic"}:
        raise ConfigurationError(
            f"dead_letter_topic={template!r} uses {sorted(fields - {'topic'})}; it may use "
            "only {topic}"
        )
    sample = template.format(topic="orders")
    if not valid_topic(sample):
        raise ConfigurationError(
            f"dead_letter_topic={template!r} does not give a valid topic name ({sample!r})"
        )


def topic_for(template: str, topic: str) -> str:
    return template.format(topic=topic)


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def headers_for(
    received: Received,
    consumer: str,
    reason: str,
    attempts: int,
    now: dt.datetime | None = None,
) -> OutHeaders:
    """The original headers, unchanged (minus stale `dlq.` ones), then where it came from and
    why it failed."""
    position = received.position
    headers: OutHeaders = [
        (name, _bytes(value))
        for name, value in received.raw_headers
        if not name.startswith(HEADER_PREFIX)
    ]
    when = (now or dt.datetime.now(dt.UTC)).isoformat()
    headers += [
        (ORIGINAL_TOPIC, position.topic.encode()),
        (ORIGINAL_PARTITION, str(position.partition).encode()),
        (ORIGINAL_OFFSET, str(position.offset).encode()),
        (CONSUMER, consumer.encode()),
        (ERROR, reason.encode("utf-8", "replace")),
        (ATTEMPTS, str(attempts).encode()),
        (DEAD_LETTERED_AT, when.encode()),
    ]
    return headers


def original(headers: RawHeaders | None) -> tuple[str | None, OutHeaders]:
    """From a dead letter's headers: the original topic, and the original headers to restore."""
    topic: str | None = None
    restored: OutHeaders = []
    for name, value in headers or []:
        if name == ORIGINAL_TOPIC and value is not None:
            try:
                topic = value.decode() if isinstance(value, bytes) else value
            except UnicodeDecodeError:
                topic = None
        elif not name.startswith(HEADER_PREFIX):
            restored.append((name, _bytes(value)))
    return topic, restored


def header(headers: Sequence[tuple[str, bytes | str | None]] | None, name: str) -> str | None:
    for key, value in headers or []:
        if key == name and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None

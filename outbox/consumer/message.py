"""The message handlers receive, and how a raw Kafka record becomes one (no I/O)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# Headers every relay source sets (relay/sinks/kafka/sink.py `kafka_headers`); the rest are the
# event's own headers.
ID_HEADER = "id"
EVENT_TYPE_HEADER = "event_type"
AGGREGATE_TYPE_HEADER = "aggregate_type"
CONTENT_TYPE_HEADER = "content_type"
RESERVED_HEADERS = frozenset(
    {ID_HEADER, EVENT_TYPE_HEADER, AGGREGATE_TYPE_HEADER, CONTENT_TYPE_HEADER}
)
JSON_CONTENT_TYPE = "application/json"

RawHeaders = Sequence[tuple[str, bytes | str | None]]


_UNDECODED: Any = object()


@dataclass(frozen=True, slots=True)
class Message:
    """One event as a handler sees it.

    `headers` are the event's own headers (as in `outbox.Event.headers`); `id`, `event_type`,
    `aggregate_type` and `content_type` travel in reserved Kafka headers and are fields here.
    `aggregate_id` is the Kafka key.
    """

    id: uuid.UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    payload: bytes
    topic: str
    partition: int
    offset: int
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = JSON_CONTENT_TYPE
    timestamp_ms: int | None = None
    _json: Any = field(default=_UNDECODED, init=False, repr=False, compare=False)

    def json(self) -> Any:
        """The payload decoded as JSON (decoded once: every call returns the same object)."""
        decoded = self._json
        if decoded is _UNDECODED:
            decoded = json.loads(self.payload)
            # A cache, not state: the message stays equal to an undecoded copy of itself.
            object.__setattr__(self, "_json", decoded)
        return decoded


class Position(NamedTuple):
    """Where a record sits in Kafka: what offsets and dead letters refer to."""

    topic: str
    partition: int
    offset: int


class Received(NamedTuple):
    """A fetched record: either a `message` to handle or a `problem` that dead-letters it.

    `key`, `value` and `raw_headers` are kept exactly as Kafka gave them so that a dead letter
    (and its replay) carries the original bytes. (Tuples: one is made per record, cheaply.)
    """

    position: Position
    key: bytes | None
    value: bytes | None
    raw_headers: RawHeaders
    message: Message | None
    problem: str | None = None

    @property
    def event_id(self) -> uuid.UUID | None:
        return self.message.id if self.message else None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return value.decode("utf-8")


def parse(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    raw_headers: RawHeaders | None,
    timestamp_ms: int | None = None,
    *,
    validate_json: bool = True,
) -> Received:
    """Turn a Kafka record into a `Received`; never raises: what cannot be read is a problem."""
    raw = list(raw_headers or [])
    position = Position(topic, partition, offset)

    def problem(reason: str) -> Received:
        return Received(position, key, value, raw, None, reason)

    headers: dict[str, str] = {}
    for name, header_value in raw:
        try:
            headers[name] = (
                header_value.decode() if isinstance(header_value, bytes)
                else header_value or ""
            )
        except UnicodeDecodeError:
            return problem(f"header {name!r} is not UTF-8")
    raw_id = headers.get(ID_HEADER)
    if not raw_id:
        return problem("the message has no 'id' header")
    try:
        event_id = uuid.UUID(raw_id)
    except ValueError:
        return problem(f"the 'id' header {raw_id[:100]!r} is not a UUID")
    event_type = headers.get(EVENT_TYPE_HEADER)
    if not event_type:
        return problem("the message has no 'event_type' header")
    if value is None:
        return problem("the message has no value (a tombstone), so no payload")
    try:
        aggregate_id = _text(key)
    except UnicodeDecodeError:
        return problem("the message key (aggregate id) is not UTF-8")
    content_type = headers.get(CONTENT_TYPE_HEADER) or JSON_CONTENT_TYPE
    message = Message(
        id=event_id,
        event_type=event_type,
        aggregate_type=headers.get(AGGREGATE_TYPE_HEADER, ""),
        aggregate_id=aggregate_id,
        payload=value,
        topic=topic,
        partition=partition,
        offset=offset,
        headers={k: v for k, v in headers.items() if k not in RESERVED_HEADERS},
        content_type=content_type,
        timestamp_ms=timestamp_ms,
    )
    if validate_json and content_type == JSON_CONTENT_TYPE:
        # Decoded now, so a payload no handler can read is dead-lettered without retries;
        # the handler's json() then reuses the result.
        try:
            message.json()
        except ValueError as exc:
            return problem(f"the payload is not valid JSON: {exc}")
    return Received(position, key, value, raw, message)

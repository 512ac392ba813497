"""The domain event recorded in the outbox and relayed to Kafka."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import InvalidEventError
from outbox.ids import uuid7

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"

Serializer = Callable[[Any], bytes]


def json_serializer(value: Any) -> bytes:
    """Compact UTF-8 JSON; refuses NaN/Infinity, which other JSON parsers reject."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Event:
    """One domain event. `payload` is a JSON-serialisable value, or bytes with `content_type`.

    `aggregate_type` routes the event to a topic, `aggregate_id` is the Kafka key (events of one
    aggregate keep their order), `id` is the consumers' dedup key.
    """

    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    topic: str | None = None
    content_type: str | None = None
    id: uuid.UUID = field(default_factory=uuid7)
    created_at: dt.datetime = field(default_factory=_utcnow)

    def __post_init__(self) -> None:
        for name in ("aggregate_type", "aggregate_id", "event_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidEventError(f"{name} must be a non-empty string, got {value!r}")
        if self.topic is not None and (not isinstance(self.topic, str) or not self.topic):
            raise InvalidEventError(f"topic must be a non-empty string or None, got {self.topic!r}")
        if not isinstance(self.id, uuid.UUID):
            raise InvalidEventError(f"id must be a uuid.UUID, got {self.id!r}")
        if not isinstance(self.headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()
        ):
            raise InvalidEventError(f"headers must map str to str, got {self.headers!r}")
        if self.created_at.tzinfo is None:
            raise InvalidEventError("created_at must be timezone-aware")
        if isinstance(self.payload, bytes | bytearray | memoryview):
            object.__setattr__(self, "payload", bytes(self.payload))
        elif self.content_type not in (None, JSON_CONTENT_TYPE):
            raise InvalidEventError(
                f"content_type {self.content_type!r} needs a bytes payload; "
                "serialise the payload yourself or leave content_type unset for JSON"
            )
        object.__setattr__(self, "headers", dict(self.headers))

    @property
    def resolved_content_type(self) -> str:
        if self.content_type:
            return self.content_type
        return BYTES_CONTENT_TYPE if isinstance(self.payload, bytes) else JSON_CONTENT_TYPE

    def encode_payload(self, serializer: Serializer = json_serializer) -> bytes:
        """The payload as the bytes that go to Kafka; raises InvalidEventError if it cannot be."""
        if isinstance(self.payload, bytes):
            return self.payload
        try:
            data = serializer(self.payload)
        except (TypeError, ValueError) as exc:
            raise InvalidEventError(
                f"payload of {self.event_type} event {self.id} is not serialisable: {exc}"
            ) from exc
        if not isinstance(data, bytes):
            raise InvalidEventError(f"the serializer returned {type(data).__name__}, not bytes")
        return data

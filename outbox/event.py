"""The domain event recorded in the outbox and relayed to Kafka."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from outbox.errors import InvalidEventError
from outbox.ids import uuid7

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

Serializer = Callable[[Any], bytes]


# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_serializer(value: Any) -> bytes:
    """Compact UTF-8 JSON; refuses NaN/Infinity, which other JSON parsers reject."""
    return _json_encoder.encode(value).encode()


_BINARY = (bytes, bytearray, memoryview)


def _check_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or value.isspace():
        raise InvalidEventError(f"{name} must be a non-empty string, got {value!r}")


def _check_headers(headers: object) -> None:
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidEventError(f"headers must map str to str, got {headers!r}")


@dataclass(frozen=True, init=False)
class Event:
    """One domain event. `payload` is a JSON-serialisable value, or bytes with `content_type`.

    `aggregate_type` routes the event to a topic, `aggregate_id` is the Kafka key (events of one
    aggregate keep their order), `id` is the consumers' dedup key. `id` (a UUIDv7) and
    `created_at` (now, UTC) are filled in when not given.
    """

    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Any
    headers: Mapping[str, str]
    topic: str | None
    content_type: str | None
    id: uuid.UUID
    created_at: dt.datetime

    def __init__(
        self,
        aggregate_type: str,
        aggregate_id: str,
        event_type: str,
        payload: Any = None,
        headers: Mapping[str, str] | None = None,
        topic: str | None = None,
        content_type: str | None = None,
        id: uuid.UUID | None = None,
        created_at: dt.datetime | None = None,
    ) -> None:
        # Hand-written rather than generated: applications build an event per business change,
        # and the generated frozen __init__ (one object.__setattr__ per field) doubled its cost.
        _check_name("aggregate_type", aggregate_type)
        _check_name("aggregate_id", aggregate_id)
        _check_name("event_type", event_type)
        if topic is not None and (not isinstance(topic, str) or not topic):
            raise InvalidEventError(f"topic must be a non-empty string or None, got {topic!r}")
        if id is None:
            id = uuid7()
        elif not isinstance(id, uuid.UUID):
            raise InvalidEventError(f"id must be a uuid.UUID, got {id!r}")
        if created_at is None:
            created_at = dt.datetime.now(dt.UTC)
        elif not isinstance(created_at, dt.datetime) or created_at.tzinfo is None:
            raise InvalidEventError(
                f"created_at must be a timezone-aware datetime, got {created_at!r}"
            )
        if headers:
            _check_headers(headers)
            # A copy, so that the caller changing its dict later does not change the event.
            headers = dict(headers)
        elif headers is None or isinstance(headers, Mapping):
            headers = {}
        else:
            _check_headers(headers)
        if isinstance(payload, _BINARY):
            payload = bytes(payload)
        elif content_type is not None and content_type != JSON_CONTENT_TYPE:
            raise InvalidEventError(
                f"content_type {content_type!r} needs a bytes payload; "
                "serialise the payload yourself or leave content_type unset for JSON"
            )
        # Frozen: fields are set once, here, straight into the instance dict.
        self.__dict__.update(
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            event_type=event_type,
            payload=payload,
            headers=headers,
            topic=topic,
            content_type=content_type,
            id=id,
            created_at=created_at,
        )

    @classmethod
    def of(
        cls,
        model: Any,
        aggregate_id: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        topic: str | None = None,
        id: uuid.UUID | None = None,
        created_at: dt.datetime | None = None,
    ) -> Event:
        """The event of a typed-event instance (a class declared with `@outbox.event_type`):
        validated, its type, aggregate type and version (header `event_version`) from the
        declaration, its aggregate id from `aggregate_id` or the declared `id_field`."""
        from outbox.contracts.registry import event_fields

        entry, key, payload, all_headers = event_fields(model, aggregate_id, headers)
        return cls(entry.aggregate, key, entry.name, payload, all_headers, topic, None, id,
                   created_at)

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

"""The stored form of an event: what the write side records and every relay source reads back."""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from outbox.errors import InvalidEventError
from outbox.ids import uuid_from_text

# Table-less mode (pg_logical_emit_message): the message content is
#   1 byte   format version (MESSAGE_FORMAT_V1 = 1)
#   4 bytes  big-endian length N of the header
#   N bytes  UTF-8 JSON header: id, aggregate_type, aggregate_id, event_type, topic,
#            content_type, headers (object of strings), created_at (ISO 8601 with offset)
#   rest     the payload bytes, unchanged
# A relay refuses versions it does not know instead of guessing.
MESSAGE_FORMAT_V1 = 1
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_HEADER_LENGTH = struct.Struct(">BI")


class OutboxRecord(NamedTuple):
    """One event as stored: payload already bytes.

    A named tuple because every event passes through one on each side (write and relay), and it
    is the cheapest immutable record to build. Its field order is the column order of the COPY
    in `outbox.copy_rows`.
    """

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: bytes
    content_type: str
    headers: Mapping[str, str] = _NO_HEADERS
    topic: str | None = None
    created_at: dt.datetime | None = None

    def encode_message(self) -> bytes:
        """The table-less (logical decoding message) encoding of this record."""
        header = {
            "id": str(self.id),
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "topic": self.topic,
            "content_type": self.content_type,
            "headers": dict(self.headers),
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return _HEADER_LENGTH.pack(MESSAGE_FORMAT_V1, len(encoded)) + encoded + self.payload


_decode_json = json.JSONDecoder().decode
_new_tuple = tuple.__new__
_REQUIRED_TEXT = ("aggregate_type", "aggregate_id", "event_type", "content_type")


def decode_message(content: bytes) -> OutboxRecord:
    """Inverse of `OutboxRecord.encode_message`; raises InvalidEventError on foreign content."""
    if len(content) < _HEADER_LENGTH.size:
        raise InvalidEventError("outbox message is too short to hold a header")
    version, length = _HEADER_LENGTH.unpack_from(content)
    if version != MESSAGE_FORMAT_V1:
        raise InvalidEventError(f"outbox message format version {version} is not supported")
    start = _HEADER_LENGTH.size
    end = start + length
    try:
        header = _decode_json(content[start:end].decode())
        for name in _REQUIRED_TEXT:
            value = header[name]
            if type(value) is not str or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        headers = header.get("headers") or _NO_HEADERS
        if headers is not _NO_HEADERS and not (
            type(headers) is dict and all(type(v) is str for v in headers.values())
        ):
            raise ValueError("headers must be a JSON object of strings")
        topic = header.get("topic")
        if topic is not None and type(topic) is not str:
            raise ValueError(f"topic must be a string or null, got {topic!r}")
        created = header.get("created_at")
        # Built positionally, without the named tuple's Python-level __new__: a relay decodes
        # one message per event.
        return _new_tuple(OutboxRecord, (
            uuid_from_text(header["id"]),
            header["aggregate_type"],
            header["aggregate_id"],
            header["event_type"],
            bytes(content[end:]),
            header["content_type"],
            headers,
            topic,
            dt.datetime.fromisoformat(created) if created else None,
        ))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidEventError(f"outbox message header is malformed: {exc}") from exc

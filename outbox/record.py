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

# Table-less mode (pg_logical_emit_message): the message content is
#   1 byte   format version (MESSAGE_FORMAT_V1 = 1)
#   4 bytes  big-endian length N of the header
#   N bytes  UTF-8 JSON header: id, aggregate_type, aggregate_id, event_type, topic,
#            content_type, headers (object of strings), created_at (ISO 8601 with offset)
#   rest     the payload bytes, unchanged
# A relay refuses versions it does not know instead of guessing.
MESSAGE_FORMAT_V1 = 1
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
    headers: Mapping[str, str] = MappingProxyType({})
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


def decode_message(content: bytes) -> OutboxRecord:
    """Inverse of `OutboxRecord.encode_message`; raises InvalidEventError on foreign content."""
    if len(content) < _HEADER_LENGTH.size:
        raise InvalidEventError("outbox message is too short to hold a header")
    version, length = _HEADER_LENGTH.unpack_from(content)
    if version != MESSAGE_FORMAT_V1:
        raise InvalidEventError(f"outbox message format version {version} is not supported")
    start = _HEADER_LENGTH.size
    try:
        header = json.loads(content[start : start + length])
        created = header.get("created_at")
        return OutboxRecord(
            id=uuid.UUID(header["id"]),
            aggregate_type=header["aggregate_type"],
            aggregate_id=header["aggregate_id"],
            event_type=header["event_type"],
            payload=bytes(content[start + length :]),
            content_type=header["content_type"],
            headers=header.get("headers") or {},
            topic=header.get("topic"),
            created_at=dt.datetime.fromisoformat(created) if created else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidEventError(f"outbox message header is malformed: {exc}") from exc

"""Events the relay could never publish: list them, and re-queue them once the cause is fixed."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox.names import SchemaNames
from outbox.record import OutboxRecord
from relay import queries


@dataclass(frozen=True)
class ParkedEvent:
    parked_id: int
    id: uuid.UUID | None
    aggregate_type: str | None
    aggregate_id: str | None
    event_type: str | None
    topic: str | None
    payload_bytes: int | None
    reason: str
    parked_at: dt.datetime
    unreadable: bool  # only the raw change is known: it cannot be re-queued


def list_parked(
    conn: psycopg.Connection[Any], names: SchemaNames, limit: int = 100
) -> list[ParkedEvent]:
    rows = conn.execute(queries.query("parked.sql", "list", names), {"limit": limit}).fetchall()
    return [ParkedEvent(*row) for row in rows]


def retry(
    conn: psycopg.Connection[Any], names: SchemaNames, ids: list[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Move parked events (all when `ids` is None) back into the outbox; returns their ids."""
    with conn.transaction():
        rows = conn.execute(
            queries.query("parked.sql", "retry", names),
            {"all": ids is None, "ids": ids or []},
        ).fetchall()
    return [row[0] for row in rows]


def park_record(
    conn: psycopg.Connection[Any], names: SchemaNames, record: OutboxRecord, reason: str
) -> None:
    """Keep an event that Kafka refused for good, with the reason."""
    conn.execute(queries.query("parked.sql", "park_event", names), {
        "id": record.id, "aggregate_type": record.aggregate_type,
        "aggregate_id": record.aggregate_id, "event_type": record.event_type,
        "topic": record.topic, "payload": record.payload, "content_type": record.content_type,
        "headers": Jsonb(dict(record.headers)), "created_at": record.created_at,
        "reason": reason,
    })


def park_raw(
    conn: psycopg.Connection[Any], names: SchemaNames, raw: dict[str, Any], reason: str
) -> None:
    """Keep a change that could not be read as an event (bytes shown as hex)."""
    readable = {k: (v.hex() if isinstance(v, bytes | bytearray | memoryview) else v)
                for k, v in raw.items()}
    conn.execute(queries.query("parked.sql", "park_raw", names),
                 {"raw": Jsonb(readable), "reason": reason})

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
from relay.core.holds import KeyHolds


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


def held_keys(conn: psycopg.Connection[Any], names: SchemaNames) -> KeyHolds:
    """The keys with parked events, each held behind its first (read when a relay starts)."""
    rows = conn.execute(queries.query("parked.sql", "holds", names)).fetchall()
    return KeyHolds(((aggregate_type, aggregate_id), event_id)
                    for aggregate_type, aggregate_id, event_id in rows)


def retry(
    conn: psycopg.Connection[Any], names: SchemaNames, ids: list[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Move parked events back into the outbox, key by key: every parked event of the keys of
    `ids` (of all keys when None), in the order they were parked. Returns their ids."""
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

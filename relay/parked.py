"""Events the relay could never publish: list them, and re-queue them once the cause is fixed."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox.names import SchemaNames
from relay import queries


@dataclass(frozen=True)
class ParkedEvent:
    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    topic: str | None
    payload_bytes: int
    reason: str
    parked_at: dt.datetime


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

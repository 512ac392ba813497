"""The parked events the console lists and redrives, read from the source's own store with the
code of `outbox parked list | retry` (relay/parked.py, relay/mongo/parked.py)."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from outbox.conninfo import libpq_url
from outbox.names import SchemaNames

# The page lists at most this many parked events (the query's LIMIT): a page for a person.
PAGE_LIMIT = 200


@dataclass(frozen=True)
class ParkedLine:
    event_id: str
    what: str
    parked_at: dt.datetime | None
    reason: str


@dataclass(frozen=True)
class ParkedGroup:
    """One key's parked events in parking order; `redrive_id` re-queues them all (None: the
    events have no key and cannot be re-queued)."""

    key: str | None
    redrive_id: uuid.UUID | None
    events: tuple[ParkedLine, ...]


class ParkedStore(Protocol):
    def groups(self, limit: int = PAGE_LIMIT) -> list[ParkedGroup]:
        """Parked events grouped by key, in parking order."""

    def redrive(self, event_id: uuid.UUID) -> int:
        """Re-queue every parked event of `event_id`'s key; how many were re-queued."""


def grouped(items: Iterable[tuple[str | None, uuid.UUID | None, ParkedLine]]) -> list[ParkedGroup]:
    """(key, re-queueable id, line) in key order -> groups; a group's first id redrives it."""
    out = []
    for key, members in itertools.groupby(items, key=lambda item: item[0]):
        listed = list(members)
        ids = [event_id for _, event_id, _ in listed if event_id is not None]
        out.append(ParkedGroup(key, ids[0] if key is not None and ids else None,
                               tuple(line for _, _, line in listed)))
    return out


class PostgresParked:
    """The parked table of a PostgreSQL relay, through a short-lived connection per call."""

    def __init__(self, db_url: str, names: SchemaNames) -> None:
        self.db_url = db_url
        self.names = names

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(libpq_url(self.db_url), connect_timeout=5, autocommit=True)

    def groups(self, limit: int = PAGE_LIMIT) -> list[ParkedGroup]:
        from relay import parked

        with self._connect() as conn:
            events = parked.list_parked(conn, self.names, limit)
        return grouped(
            (None, None, ParkedLine(f"#{e.parked_id}", "unreadable change", e.parked_at, e.reason))
            if e.unreadable else
            (f"{e.aggregate_type}/{e.aggregate_id}", e.id,
             ParkedLine(str(e.id), f"{e.event_type}, {e.payload_bytes} bytes", e.parked_at,
                        e.reason))
            for e in events)

    def redrive(self, event_id: uuid.UUID) -> int:
        from relay import parked

        with self._connect() as conn:
            return len(parked.retry(conn, self.names, [event_id]))


class MongoParked:
    """The parked collection of a MongoDB relay, through a short-lived client per call."""

    def __init__(self, config: Any) -> None:  # relay.mongo.config.MongoRelayConfig
        self.config = config

    def groups(self, limit: int = PAGE_LIMIT) -> list[ParkedGroup]:
        from relay.mongo.parked import ParkedEvents

        with ParkedEvents(self.config) as store:
            entries = store.entries(limit)
        return grouped(
            (f"{e.aggregate_type}/{e.aggregate_id}" if e.key else None,
             e.uuid if e.complete else None,
             ParkedLine(str(e.uuid or e.event_id),
                        f"{e.event_type} in {e.collection}"
                        + ("" if e.complete else " (kept without its payload)"),
                        e.parked_at, e.reason))
            for e in entries)

    def redrive(self, event_id: uuid.UUID) -> int:
        from relay.mongo.parked import ParkedEvents

        with ParkedEvents(self.config) as store:
            return len(store.retry([event_id]))

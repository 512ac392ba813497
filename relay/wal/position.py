"""The WAL relay's acknowledged position: what it records, and which transactions a new stream
may skip because Kafka has them already.

PostgreSQL resends a slot from its position on disk, which can be older than the one the relay
confirmed (before PostgreSQL 17 a logical slot's confirmed position reaches the disk only with a
later checkpoint that has other reasons to write it, not at shutdown): after a server restart
the relay would publish again every transaction it had confirmed since. It records how far it
acknowledged before the slot is confirmed there (relay/wal/cleanup.py with the removal of the
rows, else relay/wal/relay.py once a second) and remembers it across reconnects; a new stream
skips the transactions that end at or before that point (counted in `wal_skipped`). Skipped
transactions still close their group in the watermark, and in table mode their rows are
removed again (harmless if gone): a position remembered ahead of the cleaner leaves none.

The rule, where a mistake would lose events rather than duplicate them:
- a position is an acknowledged transaction's commit end LSN (or a recovered slot's consistent
  point, relay/wal/recovery.py); a transaction whose commit record *starts* below it ended at or
  before it (commit records do not overlap), so pgoutput's Begin (`final_lsn`) decides, before
  any of its events is read;
- LSNs order the WAL of one server and timeline only: a dump restored elsewhere, a failover or
  a point-in-time recovery can write new transactions at LSNs a recorded position already
  passed. A position counts only on the server (system identifier) and timeline it was read on,
  and only if that server has written WAL up to it;
- on one timeline LSNs only grow, so a slot dropped and created again (by an operator, or a
  recovery) starts after every position recorded before: nothing of it is skipped.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox.names import SchemaNames
from relay import queries
from relay.wal.lsn import format_lsn, parse_lsn
from relay.wal.pgoutput import pg_timestamp
from relay.wal.stream import SystemIdentity


@dataclass(frozen=True)
class Position:
    """Kafka acknowledged every event up to the transaction ending at `lsn`, read from the
    server `system` on `timeline`; `commit_at` is that transaction's commit time."""

    lsn: int
    system: str
    timeline: int
    commit_at: dt.datetime | None = None


def skip_below(identity: SystemIdentity, *known: Position | None) -> int:
    """Transactions whose commit starts below this LSN are in Kafka already: the greatest
    position of `known` (recorded, remembered) that holds on the server `identity` describes;
    0 (skip nothing) when none does."""
    below = 0
    for position in known:
        if (position is not None and position.system == identity.system_id
                and position.timeline == identity.timeline
                and position.lsn <= identity.wal_position):
            below = max(below, position.lsn)
    return below


class Remembered:
    """The newest position this process saw acknowledged, kept across the relay's runs (a
    reconnect after a lost server starts a new run): it may be ahead of the recorded one."""

    def __init__(self) -> None:
        self.position: Position | None = None

    def note(self, position: Position) -> None:
        current = self.position
        if (current is None or position.lsn > current.lsn or position.system != current.system
                or position.timeline != current.timeline):
            self.position = position


def recorded(conn: psycopg.Connection[Any], names: SchemaNames, slot: str) -> Position | None:
    """The position recorded for `slot`, if it says where it was read."""
    row = conn.execute(queries.query("position.sql", "recorded", names), {"slot": slot}).fetchone()
    if row is None or row[0] is None or row[2] is None or row[3] is None:
        return None
    return Position(parse_lsn(row[0]), str(row[2]), int(row[3]), row[1])


@dataclass(frozen=True)
class Origin:
    """Where positions are read: the slot, and the server's identity (IDENTIFY_SYSTEM)."""

    slot: str
    system: str
    timeline: int

    @classmethod
    def of(cls, slot: str, identity: SystemIdentity) -> Origin:
        return cls(slot, identity.system_id, identity.timeline)


def record_params(origin: Origin, end_lsn: int, commit_time_us: int) -> dict[str, Any]:
    """The parameters of position.sql's `record`: the transaction ending at `end_lsn`,
    committed at `commit_time_us` (pgoutput's microseconds), is acknowledged."""
    return {"slot": origin.slot, "lsn": format_lsn(end_lsn), "system": origin.system,
            "timeline": origin.timeline, "commit_at": pg_timestamp(commit_time_us)}


def record(conn: psycopg.Connection[Any], names: SchemaNames, origin: Origin, end_lsn: int,
           commit_time_us: int) -> None:
    """Record the position (autocommit: committed when this returns)."""
    conn.execute(_record_statement(names), record_params(origin, end_lsn, commit_time_us))


@functools.cache
def _record_statement(names: SchemaNames) -> sql.Composed:
    return queries.compose("position.sql", "record", names, condition=sql.SQL(""))

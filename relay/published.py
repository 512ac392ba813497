"""What both PostgreSQL relays do with the outbox rows they published: count the backlog, and
purge the rows kept for `keep_published` once they are old enough."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from outbox.columns import ColumnMapping
from outbox.conninfo import libpq_url
from outbox.names import SchemaNames
from relay import queries
from relay.sinks.kafka.sink import topic_sql

log = logging.getLogger(__name__)

# Rows per statement when deleting or marking: short locks, bounded WAL per transaction.
CHUNK_ROWS = 10_000
# Chunks of expired rows purged per turn of a relay: about half a second of the server's time (a
# chunk took ~50 ms, 1M rows ~5 s, on the shared 2-core test machine, 2026-12-08), so new events
# wait at most that long behind a large purge (retention shortened, or after an outage); the
# next turn goes on with the rest. See docs/performance.md (retention).
PURGE_CHUNKS_PER_TURN = 10
XID_SPACE = 1 << 32


def expire_interval(keep: dt.timedelta) -> float:
    """Seconds between purges of kept rows: once a minute (each scans the published rows), or
    twice per retention period when that is shorter."""
    return min(60.0, keep.total_seconds() / 2)


def kept_topic(template: str, columns: ColumnMapping) -> sql.Composable:
    """The `{set_topic}` of the statements that mark published rows (poll.sql mark_published,
    published.sql mark_transactions, recovery.sql mark_recovered): `, topic = <the topic the
    event was sent to>`, or nothing when that cannot be computed in SQL (sink.py `topic_sql`)."""
    resolved = topic_sql(template, columns)
    if resolved is None:
        return sql.SQL("")
    assert columns.topic is not None
    return sql.SQL(", {} = {}").format(sql.Identifier(columns.topic), resolved)


def warn_topic_not_kept(template: str, columns: ColumnMapping,
                        keep: dt.timedelta | None) -> None:
    """At start-up: say so when kept rows will not carry the topic their event went to."""
    if keep is None or topic_sql(template, columns) is not None:
        return
    why = ("the table has no topic column" if columns.topic is None
           else f"the topic template {template!r} converts or formats a field")
    log.warning("published rows are kept without their topic: %s; `outbox replay` resolves "
                "it with its own --topic-template", why, extra={
                    "event": "kept_without_topic", "topic_template": template})


def purge_expired(
    conn: psycopg.Connection[Any], names: SchemaNames, keep: dt.timedelta,
    max_chunks: int | None = None,
) -> tuple[int, bool]:
    """Delete the rows published longer than `keep` ago, chunk by chunk, at most `max_chunks`
    chunks; returns how many, and whether every expired row is gone."""
    purged, chunks = 0, 0
    while max_chunks is None or chunks < max_chunks:
        deleted = conn.execute(
            queries.query("published.sql", "delete_expired", names), {"keep": keep}).rowcount
        purged += deleted
        chunks += 1
        if deleted < CHUNK_ROWS:
            return purged, True
    return purged, False


def full_txids(xids: list[int], xmax: int) -> list[str]:
    """pgoutput's 32-bit xids as the table's xid8 values (text), given the current 64-bit
    counter `xmax`: the current epoch, or the one before for an xid above the counter's low
    half (assigned before it wrapped; a transaction still decoded is never 2^32 old)."""
    epoch, low = divmod(xmax, XID_SPACE)
    return [str((epoch - (xid > low)) * XID_SPACE + xid) for xid in xids]


def backlog_gauges(
    db_url: str, names: SchemaNames, query: sql.Composed | None = None
) -> dict[str, Callable[[], float | None]]:
    """Backlog gauges for the metrics endpoint (rows not yet published), each read with a
    short-lived connection; `query` counts them in a mapped table's layout."""
    counting = query if query is not None else queries.query("published.sql", "backlog", names)

    def backlog() -> tuple[int, float | None]:
        with psycopg.connect(libpq_url(db_url), connect_timeout=5, autocommit=True) as conn:
            row = conn.execute(counting).fetchone() or (0, None)
        oldest = row[1]
        return int(row[0]), (time.time() - oldest.timestamp()) if oldest else 0.0

    return {
        "backlog_events": lambda: backlog()[0],
        "oldest_pending_age_seconds": lambda: backlog()[1],
    }

"""Whether a slot recovery is under way (relay/wal/recovery.py), kept in the database so that a
recovery that died half-way is noticed by the next relay or command."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import psycopg

from outbox.names import SchemaNames
from relay import queries
from relay.errors import FatalRelayError

LOCK_RETRY_SECONDS = 1.0


def _query(name: str, names: SchemaNames) -> Any:
    return queries.query("recovery.sql", name, names)


def lock_key(names: SchemaNames, slot: str) -> int:
    """The advisory lock of a slot's recovery (a signed 64-bit key, stable across versions)."""
    return zlib.crc32(f"outbox-relay:recovery:{names.schema}.{slot}".encode()) - 2**31


def pending(conn: psycopg.Connection[Any], names: SchemaNames, slot: str) -> dt.datetime | None:
    """When the unfinished recovery of `slot` started, or None."""
    row = conn.execute(_query("pending", names), {"slot": slot}).fetchone()
    return row[0] if row else None


def begin(conn: psycopg.Connection[Any], names: SchemaNames, slot: str) -> None:
    conn.execute(_query("begin", names), {"slot": slot})


def end(conn: psycopg.Connection[Any], names: SchemaNames, slot: str, consistent_lsn: str) -> None:
    conn.execute(_query("end", names), {"slot": slot, "lsn": consistent_lsn})


@contextlib.contextmanager
def lock(
    conn: psycopg.Connection[Any], names: SchemaNames, slot: str, *,
    wait: bool, stop: threading.Event,
) -> Iterator[bool]:
    """Hold the recovery lock of `slot`: yields True once held (False if `stop` came first);
    without `wait`, raises LockedError when another process holds it."""
    key = lock_key(names, slot)
    while True:
        row = conn.execute(_query("try_lock", names), {"key": key}).fetchone()
        if row == (True,):
            break
        if not wait:
            raise LockedError(f"another process is recovering slot {slot} right now")
        if stop.wait(LOCK_RETRY_SECONDS):
            yield False
            return
    try:
        yield True
    finally:
        with contextlib.suppress(psycopg.Error):  # a lost connection released it already
            conn.execute(_query("unlock", names), {"key": key})


class LockedError(FatalRelayError):
    """Another process holds the slot's recovery lock."""

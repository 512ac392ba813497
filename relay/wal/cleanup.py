"""The WAL relay's bookkeeping once Kafka acknowledged: the rows of published transactions
leave the outbox table, and the position is recorded (relay/wal/position.py).

The WAL relay reads events from the log, not from the table, so nothing else would ever remove
their rows: the table, its indexes and `outbox status`'s backlog would grow forever. Once Kafka
acknowledged every event of a transaction, its rows are deleted (or, with keep_published,
marked with their commit LSN for `outbox replay`, and deleted once older than that), by
transaction id, in chunks, on a connection and a thread of their own so that streaming does not
wait for them.

The position is written by the statement that removes the last chunk (one round trip), once per
batch of transactions (GATHER_SECONDS), not per event; without rows to remove (table-less mode, a
table without txid) the relay's thread records it itself (relay/wal/relay.py). The slot is
confirmed past a transaction only after its rows are gone and the position is committed. A crash
in between sends the transaction again from the slot (the log still holds it; the rows are not
needed), which is at least once; the other order could leave rows that nothing deletes.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox.conninfo import libpq_url, redact
from outbox.names import SchemaNames
from relay import queries
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.published import (
    CHUNK_ROWS,
    PURGE_CHUNKS_PER_TURN,
    expire_interval,
    full_txids,
    purge_expired,
)
from relay.wal import position
from relay.wal.lsn import format_lsn
from relay.wal.position import Origin

log = logging.getLogger(__name__)

# Transaction ids per statement: many small transactions are deleted together, and a chunk of
# rows (CHUNK_ROWS) stays the bound for each statement.
MAX_XIDS = 10_000
GATHER_SECONDS = 0.1


class TableCleaner:
    """Deletes (or marks) the rows of acknowledged transactions and records the position;
    `cleaned_lsn` is how far the slot may be confirmed. `done` is called by the relay's thread,
    the work runs on another."""

    def __init__(
        self, db_url: str, names: SchemaNames, origin: Origin,
        keep_published: dt.timedelta | None = None,
        set_topic: sql.Composable | None = None,
    ) -> None:
        self.db_url = db_url
        self.names = names
        self.origin = origin
        self.keep_published = keep_published
        # `set_topic`: what the mark stores as each kept row's topic (relay/published.py
        # kept_topic); the statement is composed once.
        self._statement = _remove_and_record(
            names, bool(keep_published), set_topic if set_topic is not None else sql.SQL(""))
        # (xid, commit LSN) of each transaction done; the end LSN and commit time (pgoutput's
        # microseconds) of the last one
        self._queue: deque[tuple[list[tuple[int, int]], int, int]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.cleaned_lsn = 0
        self.removed = 0  # rows deleted or marked, for tests and logs

    def start(self) -> None:
        conn = _connect(self.db_url)
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="outbox-table-cleaner", daemon=True)
        self._thread.start()

    def done(self, commits: list[tuple[int, int]], end_lsn: int, commit_time_us: int) -> None:
        """Kafka acknowledged every event of these transactions, (xid, commit LSN) each, the
        last ending at `end_lsn` and committed at `commit_time_us` (pgoutput's microseconds)."""
        with self._wake:
            self._queue.append((commits, end_lsn, commit_time_us))
            if len(self._queue) == 1:
                self._wake.notify()

    def check(self) -> None:
        """Raise what stopped the cleaner, in the relay's thread."""
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, psycopg.errors.InsufficientPrivilege):
            table = f"{self.names.schema}.{self.names.table}"
            positions = f"{self.names.schema}.{self.names.position_table}"
            raise FatalRelayError(
                f"the WAL relay's role may not remove published rows from {table} or record "
                f"its position in {positions}: {redact(str(failure))}; grant it DELETE (and "
                "UPDATE (published_at, commit_lsn, topic) for --keep-published) on the table, and "
                "SELECT, INSERT, UPDATE on the position table, as deploy/roles.sql does"
            ) from failure
        raise SourceUnavailableError(
            f"removing published rows failed: {redact(str(failure))}") from failure

    def close(self, timeout: float, *, finish: bool) -> None:
        """Stop the thread; with `finish`, after the transactions queued so far (bounded)."""
        with self._wake:
            if not finish:
                self._queue.clear()
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the cleaner's thread --------------------------------------------------------------------

    def _run(self, conn: psycopg.Connection[Any]) -> None:
        keep = self.keep_published
        # Kept rows are purged on time even while nothing new is published.
        wait = expire_interval(keep) if keep is not None else None
        last_expire = 0.0
        purging = False  # a large purge under way: its next turn comes without waiting
        try:
            with conn:
                while True:
                    batch = self._take(0.0 if purging else wait)
                    if batch is None:
                        return
                    if batch:
                        commits = [commit for item, _, _ in batch for commit in item]
                        _, end_lsn, commit_time_us = batch[-1]
                        self._remove_and_record(conn, commits, end_lsn, commit_time_us)
                        self.cleaned_lsn = end_lsn
                    if keep is not None and time.monotonic() - last_expire >= expire_interval(keep):
                        _, finished = purge_expired(conn, self.names, keep, PURGE_CHUNKS_PER_TURN)
                        purging = not finished
                        if finished:
                            last_expire = time.monotonic()
        except BaseException as exc:  # reported to the relay's thread by check()
            self._failure = exc
            log.debug("table cleaner stopped", extra={"event": "cleaner_failed",
                                                      "error": redact(str(exc))})

    def _take(self, wait: float | None) -> list[tuple[list[tuple[int, int]], int, int]] | None:
        """The queued transactions, up to MAX_XIDS (none after `wait` seconds without any);
        None once closing with nothing queued."""
        with self._wake:
            if not self._queue and not self._closing:
                self._wake.wait(wait)
            if not self._queue:
                return None if self._closing else []
            # Gather for a moment: one statement for many transactions costs the server far less
            # than one each (the slot is confirmed once a second anyway).
            if not self._closing:
                self._wake.wait_for(lambda: self._closing or len(self._queue) >= MAX_XIDS,
                                    GATHER_SECONDS)
            batch, count = [], 0
            while self._queue and count < MAX_XIDS:
                item = self._queue.popleft()
                batch.append(item)
                count += len(item[0])
            return batch

    def _remove_and_record(self, conn: psycopg.Connection[Any], commits: list[tuple[int, int]],
                           end_lsn: int, commit_time_us: int) -> None:
        if not commits:
            position.record(conn, self.names, self.origin, end_lsn, commit_time_us)
            return
        params = position.record_params(self.origin, end_lsn, commit_time_us)
        row = conn.execute(queries.query("published.sql", "current_xmax", self.names)).fetchone()
        txids = full_txids([xid for xid, _ in commits], int(row[0]) if row else 0)
        params["txids"] = txids
        params["chunk"] = CHUNK_ROWS
        if self.keep_published:
            params["lsn_of"] = Jsonb({txid: format_lsn(lsn)
                                      for txid, (_, lsn) in zip(txids, commits, strict=True)})
        while True:
            found = conn.execute(self._statement, params).fetchone()
            count = int(found[0]) if found else 0
            self.removed += count
            if count < CHUNK_ROWS:
                return  # this statement recorded the position



def _remove_and_record(names: SchemaNames, mark: bool, set_topic: sql.Composable) -> sql.Composed:
    """Remove (or mark, setting `set_topic` too) a chunk of rows and, if it was the last,
    record the position."""
    remove = (queries.compose("published.sql", "mark_transactions", names, set_topic=set_topic)
              if mark else queries.query("published.sql", "delete_transactions", names))
    last_record = queries.compose("position.sql", "record", names, condition=queries.query(
        "position.sql", "last_chunk", names))
    return queries.compose("position.sql", "remove_and_record", names,
                           remove=remove, record=last_record)


def _connect(db_url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from exc

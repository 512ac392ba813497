"""Writers for ledger tests: events with per-key sequence numbers, committed or rolled back."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import psycopg

import outbox
from relay.wal.lsn import parse_lsn
from tests.support.ledger import Ledger


class SequencedWriter:
    """Makes events for one topic (used as aggregate_type) and records them in a ledger."""

    def __init__(self, topic: str, ledger: Ledger, outbox_: outbox.Outbox | None = None) -> None:
        self.topic = topic
        self.ledger = ledger
        self.outbox = outbox_ or outbox.Outbox()
        self._next: dict[str, int] = defaultdict(int)

    def events(self, key: str, count: int, *, size: int = 0) -> list[outbox.Event]:
        made = []
        for _ in range(count):
            seq = self._next[key]
            self._next[key] += 1
            payload: dict[str, Any] = {"seq": seq}
            if size:
                payload["pad"] = "x" * size
            made.append(outbox.Event(self.topic, key, "Sequenced", payload))
        return made

    def write(
        self, conn: psycopg.Connection[Any], events: list[outbox.Event], *, commit: bool = True
    ) -> None:
        """Publish `events` in the connection's transaction and commit (or roll back)."""
        self.outbox.publish(conn, *events)
        if commit:
            conn.commit()
        else:
            conn.rollback()
        self.note(events, committed=commit)

    def note(self, events: list[outbox.Event], *, committed: bool) -> None:
        for event in events:
            self.ledger.record(str(event.id), event.aggregate_id, event.payload["seq"], committed)

    def write_many(
        self, db_url: str, keys: int, per_key: int, per_transaction: int = 10
    ) -> None:
        """keys x per_key events, `per_transaction` per commit, keys interleaved."""
        with psycopg.connect(db_url) as conn:
            batch: list[outbox.Event] = []
            for _ in range(per_key):
                for k in range(keys):
                    batch += self.events(f"k{k}", 1)
                    if len(batch) == per_transaction:
                        self.write(conn, batch)
                        batch = []
            if batch:
                self.write(conn, batch)


class PacedWriter:
    """Commits `per_transaction` events at a steady rate on a thread, each transaction noted
    with an upper bound of its commit position (the WAL insert position right after it)."""

    def __init__(self, db_url: str, writer: SequencedWriter, *, per_second: int,
                 per_transaction: int = 10, keys: int = 8) -> None:
        self.db_url = db_url
        self.writer = writer
        self.interval = per_transaction / per_second
        self.per_transaction = per_transaction
        self.keys = keys
        self.transactions: list[tuple[set[str], int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def events(self) -> int:
        return len(self.transactions) * self.per_transaction

    def start(self) -> PacedWriter:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="paced-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with psycopg.connect(self.db_url) as conn:
                n = 0
                next_at = time.monotonic()
                while not self._stop.is_set():
                    batch = self.writer.events(f"k{n % self.keys}", self.per_transaction)
                    self.writer.write(conn, batch)
                    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                    conn.rollback()
                    assert row is not None
                    self.transactions.append(({str(e.id) for e in batch}, parse_lsn(row[0])))
                    n += 1
                    next_at += self.interval
                    self._stop.wait(max(0.0, next_at - time.monotonic()))  # the pace itself
        except BaseException as exc:
            self.error = exc

"""Writers for ledger tests: events with per-key sequence numbers, committed or rolled back."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import psycopg

import outbox
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

"""The writers of `outbox verify`: events at an offered rate through outbox.publish, some
transactions rolled back, one long transaction; every event recorded in the ledger."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import psycopg

import outbox
from outbox.conninfo import libpq_url, redact
from relay.verify.ledger import Ledger

EVENT_TYPE = "VerifyEvent"

H = TypeVar("H")  # a writer's connection (psycopg) or client (pymongo)


class KeyRing:
    """The keys one writer owns (every `stride`-th from `first`), used round robin.

    Writers own disjoint keys and number each key's events in the order they commit them, so the
    per-key order check of the ledger is exact even with several writers at once.
    """

    def __init__(self, first: int, stride: int, keys: int) -> None:
        self.keys = list(range(first, keys, stride)) or [first]
        self.seqs = [0] * len(self.keys)
        self._next = 0

    def take_same(self, count: int) -> list[tuple[int, int]]:
        """The next key's next `count` sequence numbers (one document's events)."""
        i = self._next % len(self.keys)
        self._next += 1
        first = self.seqs[i]
        self.seqs[i] += count
        return [(self.keys[i], seq) for seq in range(first, first + count)]

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next `count` (key, sequence number) pairs."""
        made = []
        for _ in range(count):
            i = self._next % len(self.keys)
            self._next += 1
            made.append((self.keys[i], self.seqs[i]))
            self.seqs[i] += 1
        return made


def per_transaction_for(rate: float) -> int:
    """Events per transaction: one up to 250 events/s, then as many as keep 250 commits/s
    (what four writer threads sustain next to a relay on a small machine)."""
    return max(1, math.ceil(rate / 250))


class Workload(Generic[H]):
    """`writers` threads on an open-loop schedule (a slow commit does not slow the offered
    load), plus one long transaction. Thread-safe views for the run: `committed_snapshot`.
    A subclass writes to its database: `_open`, `_close`, `_write`, `_long_transaction`."""

    def __init__(
        self,
        topic: str,
        *,
        rate: float,
        duration: float,
        writers: int,
        keys: int,
        rollback_every: int,
        long_transaction: tuple[float, float],
        stop: threading.Event,
    ) -> None:
        self.topic = topic
        self.rate = rate
        self.duration = duration
        self.writers = writers
        self.keys = keys
        self.rollback_every = rollback_every
        self.long_transaction = long_transaction
        self.stop = stop
        self.ledger = Ledger()
        self.errors: list[str] = []
        self.per_transaction = per_transaction_for(rate)
        self._lock = threading.Lock()
        self._committed: list[str] = []  # in commit order, for the recovery figures
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    # -- views for the run (other threads) ----------------------------------------------------

    def committed_count(self) -> int:
        return len(self._committed)

    def committed_at(self, index: int) -> str | None:
        """The id of the `index`-th event committed (in commit order), if there is one yet."""
        with self._lock:
            return self._committed[index] if index < len(self._committed) else None

    def committed_snapshot(self) -> list[str]:
        with self._lock:
            return list(self._committed)

    def done(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    # -- writing ------------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._writer, i), name=f"verify-writer-{i}",
                             daemon=True)
            for i in range(self.writers)
        ]
        self._threads.append(threading.Thread(
            target=self._guard, args=(self._long, self.writers), name="verify-long-transaction",
            daemon=True))
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _guard(self, body: Callable[[int], None], index: int) -> None:
        try:
            body(index)
        except Exception as exc:  # reported with the verdict: a writer failure voids the run
            with self._lock:
                self.errors.append(f"writer {index}: {redact(str(exc)) or type(exc).__name__}")

    # A transaction's events go to one key: MongoDB's are one document's (one atomic update).
    one_key_per_transaction = False

    def _events(self, ring: KeyRing, count: int) -> list[outbox.Event]:
        taken = ring.take_same(count) if self.one_key_per_transaction else ring.take(count)
        return [outbox.Event(EVENT_TYPE, f"k{key}", EVENT_TYPE, {"seq": seq}, topic=self.topic)
                for key, seq in taken]

    def _record(self, events: list[outbox.Event], outcome: str) -> None:
        with self._lock:
            for event in events:
                event_id, key, seq = str(event.id), event.aggregate_id, event.payload["seq"]
                if outcome == "doubt":
                    self.ledger.doubt(event_id, key, seq)
                else:
                    self.ledger.record(event_id, key, seq, outcome == "committed")
                    if outcome == "committed":
                        self._committed.append(event_id)

    def _writer(self, index: int) -> None:
        # The long transaction's key (0) is its own; the writers share out the others.
        ring = KeyRing(index + 1, self.writers, self.keys + 1)
        tx_rate = self.rate / self.per_transaction
        transactions = max(1, round(self.duration * tx_rate))
        handle = self._open()
        try:
            for number, slot in enumerate(range(index, transactions, self.writers), start=1):
                due = self.started + slot / tx_rate
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                events = self._events(ring, self.per_transaction)
                # The 2nd, then every n-th: a short or slow run has rollbacks too.
                rollback = self.rollback_every > 0 and (number - 2) % self.rollback_every == 0
                handle = self._write(handle, events, rollback)
        finally:
            self._close(handle)

    def _long(self, index: int) -> None:
        """Opens early, writes, commits late: its rows sit below many later commits."""
        begin, end = self.long_transaction
        if self.stop.wait(max(0.0, self.started + begin - time.monotonic())):
            return
        events = self._events(KeyRing(0, 1, 1), 5)

        def until_end() -> None:
            # Committed even when the run is interrupted: the ledger then knows its events.
            self.stop.wait(max(0.0, self.started + end - time.monotonic()))

        self._record(events, self._long_transaction(events, until_end))

    # -- the database's part ------------------------------------------------------------------

    def _open(self) -> H:
        raise NotImplementedError

    def _close(self, handle: H) -> None:
        raise NotImplementedError

    def _write(self, handle: H, events: list[outbox.Event], rollback: bool) -> H:
        """One transaction, recorded with `_record`; returns the handle to go on with."""
        raise NotImplementedError

    def _long_transaction(self, events: list[outbox.Event], wait: Callable[[], None]) -> str:
        """Write `events` in a transaction, `wait()`, commit; the outcome for `_record`."""
        raise NotImplementedError


class PostgresWorkload(Workload[psycopg.Connection[Any]]):
    """Events written with outbox.publish into the scratch table."""

    def __init__(self, db_url: str, schema: str, table: str, topic: str, **plan: Any) -> None:
        super().__init__(topic, **plan)
        self.db_url = libpq_url(db_url)
        self.outbox = outbox.Outbox(schema=schema, table=table)

    def _open(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.db_url, connect_timeout=10)

    def _close(self, handle: psycopg.Connection[Any]) -> None:
        handle.close()

    def _write(
        self, conn: psycopg.Connection[Any], events: list[outbox.Event], rollback: bool
    ) -> psycopg.Connection[Any]:
        """One transaction; a broken connection is replaced (its events recorded as they
        ended: rolled back before COMMIT, in doubt during it)."""
        try:
            self.outbox.publish(conn, *events)
        except psycopg.OperationalError:
            self._record(events, "rolled back")
            conn.close()
            return self._open()
        if rollback:
            conn.rollback()
            self._record(events, "rolled back")
            return conn
        try:
            conn.commit()
        except psycopg.OperationalError:
            self._record(events, "doubt")
            conn.close()
            return self._open()
        self._record(events, "committed")
        return conn

    def _long_transaction(self, events: list[outbox.Event], wait: Callable[[], None]) -> str:
        with self._open() as conn:
            self.outbox.publish(conn, *events)
            wait()
            conn.commit()
        return "committed"

"""The four relay sources behind one test interface, for the relay contract suite.

Each source says how a writer records events in it, how a test sees that the relay acknowledged
them, where parked events go, and which capabilities it has (as Watermill's test features and
eventsourcing's per-backend suites do). Relays are driven only through `RelaySettings` and the
`outbox relay` command, so the suite keeps working whatever the relays look like inside.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

import outbox
from outbox import mongo as outbox_mongo
from relay.settings import RelaySettings
from tests.support import mongo as mongo_support
from tests.support.relays import wait_for
from tests.support.wal import WalSlot, commit_lsn

SOURCES = ("postgres-poll", "postgres-wal", "mongo-poll", "mongo-stream")


@dataclass(frozen=True)
class Capabilities:
    """What a source can do beyond the guarantees every source keeps."""

    # The ways a writer records an event for this source (the first is the usual one).
    # "message" is the table-less mode: logical decoding messages, no outbox table.
    modes: tuple[str, ...]
    # `keep_published`: acknowledged rows are marked, then purged once old enough.
    keep_published: bool = False
    # A writer's transaction can stay open while later transactions commit and are relayed.
    open_transactions: bool = False
    # Events of concurrent transactions go out in commit order, whatever order they were
    # written in (WAL order), not only when the application serialises them per aggregate.
    commit_order: bool = False
    # The position survives a restart as a stored resume token.
    resume_token: bool = False
    # Two relays at once: one publishes, the other waits and takes over.
    standby: bool = True
    # Events Kafka refuses for good are parked with a reason and hold their key.
    parking: bool = True


CAPABILITIES = {
    "postgres-poll": Capabilities(modes=("table",), keep_published=True, open_transactions=True),
    "postgres-wal": Capabilities(modes=("table", "message", "insert-then-delete"),
                                 keep_published=True, open_transactions=True, commit_order=True),
    "mongo-poll": Capabilities(modes=("embedded", "collection")),
    "mongo-stream": Capabilities(modes=("embedded", "collection"), resume_token=True),
}


def sources_with(capability: str) -> list[str]:
    """The sources that have `capability` (a boolean field of `Capabilities`)."""
    return [name for name in SOURCES if getattr(CAPABILITIES[name], capability)]


def source_modes(*, all_modes: bool = True) -> list[Any]:
    """(source, write mode) parameters: every mode of every source, or each source's usual one."""
    return [pytest.param(name, mode, id=f"{name}-{mode}")
            for name in SOURCES
            for mode in (CAPABILITIES[name].modes if all_modes else CAPABILITIES[name].modes[:1])]


class Appender(ABC):
    """A writer of one thread: takes a key's next sequence number and records one event with it,
    in one unit of work, as an application serialising writes per aggregate does."""

    @abstractmethod
    def append(self, key: str, make: Callable[[str, int], outbox.Event], *, commit: bool,
               rng: random.Random) -> tuple[outbox.Event, int] | None:
        """The event and its sequence number, or None when the write lost a race (retry)."""


class RelaySource(ABC):
    """One relay source, set up for one test."""

    name: str
    capabilities: Capabilities

    @abstractmethod
    def settings(self, kafka: str, **overrides: Any) -> RelaySettings: ...

    @abstractmethod
    def cli_args(self, kafka: str) -> list[str]:
        """`outbox relay` options for this source (for a relay run as a process)."""

    @abstractmethod
    def started(self, alive: Callable[[], bool]) -> None:
        """Return once a relay just started captures every event written from now on."""

    @abstractmethod
    def write(self, events: list[outbox.Event], *, commit: bool = True, mode: str | None = None,
              max_payload_bytes: int | None = None) -> None:
        """Record `events` in one unit of work, committed or rolled back (`max_payload_bytes`:
        the writer's limit, for events larger than its default)."""

    @abstractmethod
    def pending(self) -> int:
        """How many committed events the source still holds unacknowledged (-1: unknown)."""

    @abstractmethod
    def acknowledged(self) -> bool:
        """Whether every event committed so far is acknowledged at the source."""

    def wait_acknowledged(self, timeout: float = 30, what: str = "") -> None:
        wait_for(self.acknowledged, timeout,
                 f"{self.name} to acknowledge every committed event {what}".strip())

    @abstractmethod
    def stored(self) -> int:
        """How many events the source still stores, acknowledged or not (kept rows count)."""

    @abstractmethod
    def parked(self) -> list[tuple[uuid.UUID | None, str]]:
        """(event id, reason) of the parked events, in parking order."""

    @abstractmethod
    def parked_cli(self) -> list[str]:
        """The `outbox parked` options naming this source's parked events."""

    @abstractmethod
    def discard_parked(self) -> None:
        """What an operator does who gives up on the parked events."""

    @abstractmethod
    def appender(self) -> AbstractContextManager[Appender]:
        """A writer of one thread (each thread takes its own) for the prepared aggregates."""

    @abstractmethod
    def prepare_aggregates(self, keys: list[str]) -> None:
        """Create the aggregates `appender` writes to, each at sequence number 0."""

    @abstractmethod
    def sequence_total(self) -> int:
        """The sum of the aggregates' sequence numbers: how many appends committed."""

    @abstractmethod
    def leader(self) -> object | None:
        """Who holds the source now, as the database tells (None: nobody)."""

    def standby_logged(self, records: Iterable[logging.LogRecord]) -> bool:
        """Whether a relay logged that it waits as a standby."""
        return any(getattr(r, "event", None) == "relay_standby"
                   or getattr(r, "action", None) == "wal.standby.waiting" for r in records)

    @abstractmethod
    def close(self) -> None: ...


class PostgresSource(RelaySource):
    def __init__(self, name: str, db_url: str) -> None:
        self.name = name
        self.capabilities = CAPABILITIES[name]
        self.db_url = db_url
        self.slot = WalSlot.create(db_url) if name == "postgres-wal" else None
        self._last_commit = 0  # WAL: the end of the last commit written through `write`
        self._lock = threading.Lock()  # writers of several threads note their commits

    def settings(self, kafka: str, **overrides: Any) -> RelaySettings:
        if self.slot is not None:
            return self.slot.settings(kafka, **overrides)
        values: dict[str, Any] = {"source": "postgres-poll", "db_url": self.db_url,
                                  "kafka_bootstrap": kafka, "poll_interval": 0.2, **overrides}
        return RelaySettings(**values)

    def cli_args(self, kafka: str) -> list[str]:
        if self.slot is not None:
            return self.slot.cli_args(kafka)
        return ["--source", "postgres-poll", "--db", self.db_url, "--kafka", kafka,
                "--poll-interval", "0.2"]

    def started(self, alive: Callable[[], bool]) -> None:
        """The slot (WAL) or the table (polling) keeps what is written before the relay runs."""

    def close(self) -> None:
        """The database (and with it the slot) goes with the db_url fixture."""

    def write(self, events: list[outbox.Event], *, commit: bool = True, mode: str | None = None,
              max_payload_bytes: int | None = None) -> None:
        mode = mode or self.capabilities.modes[0]
        assert mode in self.capabilities.modes, f"{self.name} has no write mode {mode}"
        options: dict[str, Any] = {"mode": "message"} if mode == "message" else {}
        if max_payload_bytes is not None:
            options["max_payload_bytes"] = max_payload_bytes
        box = outbox.Outbox(**options)
        with psycopg.connect(self.db_url) as conn:
            box.publish(conn, *events)
            if mode == "insert-then-delete":
                # A writer that keeps the table empty: the rows never persist, their inserts
                # are in the log all the same.
                conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", [[e.id for e in events]])
            if not commit:
                conn.rollback()
            else:
                self.committed(conn)

    def committed(self, conn: psycopg.Connection[Any]) -> None:
        """Commit `conn`'s transaction of outbox writes (WAL: noting where the commit ends)."""
        if self.slot is None:
            conn.commit()
        else:
            end = commit_lsn(conn)
            with self._lock:
                self._last_commit = max(self._last_commit, end)

    def _count(self, query: str) -> int:
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    def pending(self) -> int:
        if self.slot is None:
            return self._count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return -1  # WAL: the slot tells where the relay is, not how many events lie beyond

    def stored(self) -> int:
        return self._count("SELECT count(*) FROM outbox")

    def acknowledged(self) -> bool:
        if self.slot is None:
            return self.pending() == 0
        # The slot has moved past the last commit, and the published rows went before it did.
        return (self.slot.confirmed() >= self._last_commit
                and self._count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0)

    def parked(self) -> list[tuple[uuid.UUID | None, str]]:
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute("SELECT id, reason FROM outbox_parked ORDER BY parked_id")
            return [(row[0], row[1]) for row in rows]

    def parked_cli(self) -> list[str]:
        return ["--db", self.db_url]

    def discard_parked(self) -> None:
        with psycopg.connect(self.db_url) as conn:
            conn.execute("DELETE FROM outbox_parked")

    def prepare_aggregates(self, keys: list[str]) -> None:
        with psycopg.connect(self.db_url) as conn:
            conn.execute("CREATE TABLE aggregates (key text PRIMARY KEY, seq int NOT NULL)")
            conn.cursor().executemany("INSERT INTO aggregates VALUES (%s, 0)",
                                      [(k,) for k in keys])

    @contextmanager
    def appender(self) -> Iterator[Appender]:
        with psycopg.connect(self.db_url) as conn:
            yield PostgresAppender(self, conn)

    def sequence_total(self) -> int:
        return self._count("SELECT coalesce(sum(seq), 0) FROM aggregates")

    def leader(self) -> object | None:
        if self.slot is not None:
            status = self.slot.status()
            return status.active_pid if status and status.active else None
        # The polling relay leads while it holds the outbox's advisory lock.
        with psycopg.connect(self.db_url) as conn:
            row = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
        return row[0] if row else None


class PostgresAppender(Appender):
    def __init__(self, source: PostgresSource, conn: psycopg.Connection[Any]) -> None:
        self.source = source
        self.conn = conn

    def append(self, key: str, make: Callable[[str, int], outbox.Event], *, commit: bool,
               rng: random.Random) -> tuple[outbox.Event, int] | None:
        # The aggregate's row lock serialises its writers; holding the transaction open a
        # little makes commits interleave across writers.
        row = self.conn.execute("UPDATE aggregates SET seq = seq + 1 WHERE key = %s"
                                " RETURNING seq", [key]).fetchone()
        assert row is not None
        event = make(key, row[0])
        outbox.publish(self.conn, event)
        self.conn.execute("SELECT pg_sleep(%s)", [rng.random() * 0.01])
        if commit:
            self.source.committed(self.conn)
        else:
            self.conn.rollback()
        return event, row[0]


def by_key(events: list[outbox.Event]) -> list[tuple[str, list[outbox.Event]]]:
    """The events grouped by aggregate, each group in the order given (one write per group: a
    MongoDB write costs far more than an event in it)."""
    groups: dict[str, list[outbox.Event]] = {}
    for event in events:
        groups.setdefault(event.aggregate_id, []).append(event)
    return list(groups.items())


class MongoSource(RelaySource):
    def __init__(self, name: str, mongo_url: str) -> None:
        self.name = name
        self.capabilities = CAPABILITIES[name]
        self.url = mongo_support.new_database(mongo_url)
        self.client: MongoClient[dict[str, Any]] = MongoClient(
            self.url, serverSelectionTimeoutMS=10_000)
        self.db = self.client.get_default_database()

    def settings(self, kafka: str, **overrides: Any) -> RelaySettings:
        return mongo_support.settings(self.name, self.url, kafka, **overrides)

    def cli_args(self, kafka: str) -> list[str]:
        return ["--source", self.name, "--mongo", self.url, "--collections", "orders",
                "--kafka", kafka, "--poll-interval", "0.2"]

    def started(self, alive: Callable[[], bool]) -> None:
        if self.name == "mongo-stream":  # events written before the stream opens would wait
            wait_for(lambda: not alive() or mongo_support.token_stored(self.db), 60,
                     "the stream to start")
            assert alive(), "the relay died at start-up"

    def write(self, events: list[outbox.Event], *, commit: bool = True, mode: str | None = None,
              max_payload_bytes: int | None = None) -> None:
        mode = mode or self.capabilities.modes[0]
        assert mode in self.capabilities.modes, f"{self.name} has no write mode {mode}"
        box = (outbox_mongo.MongoOutbox() if max_payload_bytes is None
               else outbox_mongo.MongoOutbox(max_payload_bytes=max_payload_bytes))
        if mode == "embedded" and commit:
            # Events embedded in their aggregate's document: one atomic update per aggregate.
            for key, group in by_key(events):
                self.db.orders.update_one(
                    {"_id": key}, box.with_events({"$inc": {"version": 1}}, *group),
                    upsert=True)
            return
        while True:
            try:
                self._transaction(events, box, commit=commit, mode=mode)
                return
            except PyMongoError as exc:
                # A write conflict (with the relay pulling entries from the same documents):
                # nothing was written. A rollback is done either way; a commit is tried again.
                if not commit:
                    return
                if not exc.has_error_label("TransientTransactionError"):
                    raise

    def _transaction(self, events: list[outbox.Event], box: outbox_mongo.MongoOutbox, *,
                     commit: bool, mode: str) -> None:
        with self.client.start_session() as session:
            session.start_transaction()
            if mode == "collection":
                for key in dict.fromkeys(e.aggregate_id for e in events):
                    self.db.orders.update_one({"_id": key}, {"$inc": {"version": 1}},
                                              upsert=True, session=session)
                box.publish(self.db, *events, session=session)
            else:
                for key, group in by_key(events):
                    self.db.orders.update_one(
                        {"_id": key}, box.with_events({"$inc": {"version": 1}}, *group),
                        upsert=True, session=session)
            if commit:
                session.commit_transaction()
            else:
                session.abort_transaction()

    def pending(self) -> int:
        return mongo_support.pending_events(self.db)

    def acknowledged(self) -> bool:
        return self.pending() == 0

    def stored(self) -> int:
        return self.pending()

    def parked(self) -> list[tuple[uuid.UUID | None, str]]:
        documents = self.db.outbox_parked.find({}, sort=[("seq", 1)])
        return [(outbox_mongo.event_id_of(d["_id"]), d["reason"]) for d in documents]

    def parked_cli(self) -> list[str]:
        return ["--mongo", self.url, "--collections", "orders"]

    def discard_parked(self) -> None:
        self.db.outbox_parked.delete_many({})

    def prepare_aggregates(self, keys: list[str]) -> None:
        self.db.orders.insert_many([{"_id": key, "version": 0} for key in keys])

    @contextmanager
    def appender(self) -> Iterator[Appender]:
        yield MongoAppender(self)

    def sequence_total(self) -> int:
        return sum(int(d["version"]) for d in self.db.orders.find({}, {"version": 1}))

    def leader(self) -> object | None:
        lease = self.db.outbox_relay_state.find_one({"_id": {"$regex": "^lease:"}})
        return lease.get("owner") if lease else None

    def close(self) -> None:
        self.client.drop_database(self.db.name)
        self.client.close()


class MongoAppender(Appender):
    """Optimistic concurrency: the sequence number is the document's version, so list order and
    sequence order agree even with writers racing on the same document."""

    def __init__(self, source: MongoSource) -> None:
        self.source = source

    def append(self, key: str, make: Callable[[str, int], outbox.Event], *, commit: bool,
               rng: random.Random) -> tuple[outbox.Event, int] | None:
        orders = self.source.db.orders
        current = orders.find_one({"_id": key}, {"version": 1})
        assert current is not None
        version = current["version"] + 1
        event = make(key, version)
        update = outbox_mongo.with_events({"$set": {"version": version}}, event)
        if commit:
            result = orders.update_one({"_id": key, "version": version - 1}, update)
            return (event, version) if result.modified_count else None
        try:
            with self.source.client.start_session() as session:
                session.start_transaction()
                orders.update_one({"_id": key, "version": version - 1}, update, session=session)
                session.abort_transaction()
        except PyMongoError:
            pass  # a write conflict with another writer: nothing was written either way
        return event, version


def make_source(request: pytest.FixtureRequest, name: str) -> RelaySource:
    """The source `name` on a database of this test alone (from the conftest fixtures)."""
    if name.startswith("postgres"):
        return PostgresSource(name, request.getfixturevalue("db_url"))
    return MongoSource(name, request.getfixturevalue("mongo_url"))

"""Every inbox store of the idempotent consumer behind one synchronous face, for the contract
suite (tests/integration/test_inbox_store_contract.py).

A `Variant` names one way to build a store (driver, asyncio or not, what `db` is) and what its
database does (migrations, one connection, waits on a concurrent claim). A `Harness` builds
stores of one variant over real servers, runs their calls (the asyncio ones on a loop thread,
so that a test can leave one call waiting while it acts elsewhere), does a handler's work on a
transaction's handle, and looks at the database from outside. Only the public store classes and
their Protocols (`InboxStore`, `AsyncInboxStore`) are used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import gc
import inspect
import socket
import threading
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from bson import Binary
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.client_session import ClientSession
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from outbox.consumer import HandlerCommitError
from outbox.consumer.aio_stores import (
    AsyncMongoStore,
    AsyncPsycopgStore,
    AsyncSqlAlchemyStore,
)
from outbox.consumer.mongo import MongoStore
from outbox.consumer.stores import InboxStore, PsycopgStore, SqlAlchemyStore
from outbox.consumer.testing import (
    AsyncMemoryInbox,
    MemoryInbox,
    MemorySession,
    RejectedCommitError,
)
from outbox.names import SchemaNames
from tests.support.pg import sqlalchemy_url
from tests.support.relays import wait_for

T = TypeVar("T")

# The methods of InboxStore / AsyncInboxStore, and which of them the asyncio Protocol awaits.
STORE_METHODS = {"check": True, "begin": True, "is_transient": False, "purge": True,
                 "close": True}
TRANSACTION_METHODS = {"claim": True, "read_sequences": True, "save_sequences": True,
                       "commit": True, "rollback": True}


@dataclass(frozen=True)
class Variant:
    id: str
    family: str  # "postgres", "mongo" or "memory"
    driver: str  # "sqlalchemy", "psycopg", "pymongo" or "memory"
    db: str  # what the store is given: engine, sessionmaker, pool, conninfo, connection, ...
    asyncio: bool = False

    @property
    def migrated(self) -> bool:
        """The inbox is a table created by `outbox migrate`; `check` fails while it is not."""
        return self.family == "postgres"

    @property
    def one_connection(self) -> bool:
        """The store runs every transaction on one connection (its own, or the caller's)."""
        return self.db in ("conninfo", "connection")

    @property
    def reconnects(self) -> bool:
        """After a lost connection the store works again (a caller's connection stays lost)."""
        return self.db != "connection"

    @property
    def concurrent_claim(self) -> str:
        """What a claim of an id that another open transaction claimed does: "waits" for that
        transaction (PostgreSQL's unique index), "conflicts" at once (MongoDB aborts the later
        writer with a transient WriteConflict), or "none" (the in-memory store cannot tell)."""
        return {"postgres": "waits", "mongo": "conflicts"}.get(self.family, "none")

    @property
    def handle_type(self) -> type:
        return {
            ("sqlalchemy", False): Session, ("sqlalchemy", True): AsyncSession,
            ("psycopg", False): psycopg.Connection, ("psycopg", True): psycopg.AsyncConnection,
            ("pymongo", False): ClientSession, ("pymongo", True): AsyncClientSession,
            ("memory", False): MemorySession, ("memory", True): MemorySession,
        }[self.driver, self.asyncio]

    @property
    def own_commit_error(self) -> type[BaseException]:
        """What a handler's own commit on the handle raises (psycopg refuses it itself inside
        the store's transaction block; HandlerCommitError says the same for the others)."""
        return psycopg.ProgrammingError if self.driver == "psycopg" else HandlerCommitError


VARIANTS = [
    Variant("sqlalchemy-engine", "postgres", "sqlalchemy", "engine"),
    Variant("sqlalchemy-sessionmaker", "postgres", "sqlalchemy", "sessionmaker"),
    Variant("psycopg-pool", "postgres", "psycopg", "pool"),
    Variant("psycopg-conninfo", "postgres", "psycopg", "conninfo"),
    Variant("psycopg-connection", "postgres", "psycopg", "connection"),
    Variant("async-sqlalchemy-engine", "postgres", "sqlalchemy", "engine", asyncio=True),
    Variant("async-sqlalchemy-sessionmaker", "postgres", "sqlalchemy", "sessionmaker",
            asyncio=True),
    Variant("async-psycopg-pool", "postgres", "psycopg", "pool", asyncio=True),
    Variant("async-psycopg-conninfo", "postgres", "psycopg", "conninfo", asyncio=True),
    Variant("async-psycopg-connection", "postgres", "psycopg", "connection", asyncio=True),
    Variant("mongo", "mongo", "pymongo", "database"),
    Variant("async-mongo", "mongo", "pymongo", "database", asyncio=True),
    Variant("memory", "memory", "memory", "memory"),
    Variant("async-memory", "memory", "memory", "memory", asyncio=True),
]


# -- running asyncio calls from a synchronous test ----------------------------------------------


class LoopThread:
    """An event loop on its own thread: a test waits for one call while another one waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="contract-loop",
                                        daemon=True)
        self._thread.start()

    def submit(self, awaitable: Awaitable[T]) -> concurrent.futures.Future[T]:
        async def wait() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop)

    def run(self, awaitable: Awaitable[T], timeout: float = 60) -> T:
        return self.submit(awaitable).result(timeout)

    def close(self) -> None:
        async def drain() -> None:
            await self.loop.shutdown_asyncgens()

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class Io:
    """Gives back a sync call's value, or runs an asyncio call's awaitable to its value."""

    def __init__(self) -> None:
        self._loop: LoopThread | None = None

    @property
    def loop(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread()
        return self._loop

    def __call__(self, value: Any) -> Any:
        return self.loop.run(value) if inspect.isawaitable(value) else value

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


class Transaction:
    """`InboxTransaction` / `AsyncInboxTransaction`, called synchronously."""

    def __init__(self, raw: Any, store: Store, io: Io) -> None:
        self.raw = raw
        self.store = store
        self._io = io

    @property
    def handle(self) -> Any:
        return self.raw.handle

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        claimed = self._io(self.raw.claim(list(ids)))
        assert isinstance(claimed, set)
        return claimed

    def read_sequences(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        found = self._io(self.raw.read_sequences(list(keys)))
        assert isinstance(found, dict)
        return found

    def save_sequences(self, numbers: dict[tuple[str, str], int]) -> None:
        self._io(self.raw.save_sequences(numbers))

    def commit(self) -> None:
        self._io(self.raw.commit())

    def rollback(self) -> None:
        self._io(self.raw.rollback())


class Store:
    """`InboxStore` / `AsyncInboxStore`, called synchronously; `db` is what it was given.
    Consumer names are the test's plain ones (see `Harness.consumer`)."""

    def __init__(self, raw: Any, db: Any, io: Io, names: Callable[[str], str]) -> None:
        self.raw = raw
        self.db = db
        self._io = io
        self._names = names

    def check(self) -> None:
        self._io(self.raw.check())

    def begin(self) -> Transaction:
        return Transaction(self._io(self.raw.begin()), self, self._io)

    def is_transient(self, error: BaseException) -> bool:
        transient = self.raw.is_transient(error)
        assert isinstance(transient, bool)
        return transient

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        named = None if consumer is None else self._names(consumer)
        deleted = self._io(self.raw.purge(older_than, named))
        assert isinstance(deleted, int)
        return deleted

    def close(self) -> None:
        self._io(self.raw.close())


# -- addresses ------------------------------------------------------------------------------


def free_port() -> int:
    """A port where nothing listens (taken and freed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the harness ----------------------------------------------------------------------------


class Harness:
    """Stores of one variant over one database, and what a test does around them."""

    def __init__(self, variant: Variant, *, db_url: str | None = None,
                 mongo_url: str | None = None) -> None:
        self.variant = variant
        self.token = uuid.uuid4().hex[:8]
        self.effects_table = f"contract_effects_{self.token}"
        self.io = Io()
        self.db_url = db_url
        self.mongo_url = mongo_url
        self._cleanups: list[Callable[[], None]] = []
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self._memory_rows: dict[tuple[str, uuid.UUID], dt.datetime] = {}
        self._memory_effects: list[Any] = []
        self._memory_sequences: dict[tuple[str, str, str], int] = {}
        self.mongo: MongoClient[dict[str, Any]] | None = None
        if variant.family == "postgres":
            assert db_url is not None
            self.outside: Any = PostgresOutside(db_url, self)
            self._cleanups.append(self.outside.close)
            self.outside.execute(f"CREATE TABLE {self.effects_table} (n int PRIMARY KEY)")
        elif variant.family == "mongo":
            assert mongo_url is not None
            self.mongo = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
            database = self.mongo.get_default_database()
            # Created up front: a collection created implicitly inside two transactions
            # conflicts.
            database.create_collection(self.effects_table)
            self.outside = MongoOutside(database, self)
            client = self.mongo

            def drop() -> None:
                client.drop_database(database.name)
                client.close()

            self._cleanups.append(drop)
        else:
            self.outside = MemoryOutside(self._memory_rows, self._memory_effects, self)

    def consumer(self, name: str) -> str:
        """The consumer name a store of this test uses for `name`: tests that share a database
        keep apart by name."""
        return f"{name}-{self.token}"

    def plain(self, consumer: str) -> str | None:
        """`name` for a consumer name of this test, None for another test's."""
        suffix = f"-{self.token}"
        return consumer.removesuffix(suffix) if consumer.endswith(suffix) else None

    def close(self) -> None:
        """Close what the harness made, last made first; every cleanup runs even when one
        fails (the first failure is raised at the end)."""
        self._threads.shutdown(wait=True)
        failures: list[BaseException] = []
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:
                failures.append(exc)
        self._cleanups.clear()
        self.io.close()
        if failures:
            raise failures[0]

    # -- building stores -------------------------------------------------------------------

    def store(self, consumer: str = "billing", *, url: str | None = None,
              application_name: str | None = None, unreachable: bool = False,
              sequence: bool = False) -> Store:
        """A new store of this variant, with resources of its own (pool, engine, connection,
        client), over the harness's database, over `url`, or over a server address where
        nothing listens; `sequence`: for a consumer with ordering="sequence"."""
        variant = self.variant
        consumer = self.consumer(consumer)
        if variant.family == "postgres":
            conninfo = url or self.db_url
            assert conninfo is not None
            if application_name is not None:
                conninfo = psycopg.conninfo.make_conninfo(conninfo,
                                                          application_name=application_name)
            if unreachable:
                conninfo = psycopg.conninfo.make_conninfo(
                    conninfo, host="127.0.0.1", port=str(free_port()), connect_timeout="2")
            db = (self._async_postgres_db(conninfo, unreachable) if variant.asyncio
                  else self._postgres_db(conninfo, unreachable))
            raw: Any = {
                (False, "sqlalchemy"): SqlAlchemyStore, (False, "psycopg"): PsycopgStore,
                (True, "sqlalchemy"): AsyncSqlAlchemyStore, (True, "psycopg"): AsyncPsycopgStore,
            }[variant.asyncio, variant.driver](db, consumer, SchemaNames(), sequence=sequence)
        elif variant.family == "mongo":
            assert self.mongo_url is not None
            if unreachable:
                if variant.asyncio:
                    # Runs after the client's close (cleanups run last first).
                    self._cleanups.append(_collect_sockets_pymongo_leaked)
                db = self.mongo_database(
                    f"mongodb://127.0.0.1:{free_port()}/contract?directConnection=true",
                    serverSelectionTimeoutMS=200, connectTimeoutMS=200)
            else:
                db = self.mongo_database(self.mongo_url)
            raw = (AsyncMongoStore if variant.asyncio else MongoStore)(
                db, consumer, sequence=sequence)
        else:
            assert not unreachable, "the in-memory store has no server"
            raw = AsyncMemoryInbox(consumer) if variant.asyncio else MemoryInbox(consumer)
            memory = memory_inbox(raw)
            # MemoryInbox instances share nothing; two stores of one "database" share rows and
            # committed effects, as two processes share a PostgreSQL database.
            memory.rows = self._memory_rows
            memory.effects = self._memory_effects
            memory.sequences = self._memory_sequences
            db = raw
        store = Store(raw, db, self.io, self.consumer)
        self._cleanups.append(store.close)
        return store

    def _postgres_db(self, conninfo: str, unreachable: bool) -> Any:
        kind = self.variant.db
        if kind in ("engine", "sessionmaker"):
            engine = create_engine(sqlalchemy_url(conninfo), connect_args={
                "application_name": psycopg.conninfo.conninfo_to_dict(conninfo).get(
                    "application_name", "")})
            self._cleanups.append(engine.dispose)
            return engine if kind == "engine" else sessionmaker(engine)
        if kind == "pool":
            # One connection: a transaction the store did not give back shows as a timeout.
            pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                conninfo, min_size=1, max_size=1, open=True, timeout=0.5 if unreachable else 30)
            self._cleanups.append(pool.close)
            if not unreachable:
                pool.wait()
            return pool
        if kind == "connection":
            assert not unreachable, "a connection to nowhere cannot be made"
            connection = psycopg.connect(conninfo)
            self._cleanups.append(connection.close)
            return connection
        return conninfo

    def _async_postgres_db(self, conninfo: str, unreachable: bool) -> Any:
        kind = self.variant.db
        io = self.io
        if kind in ("engine", "sessionmaker"):
            async def make_engine() -> AsyncEngine:
                return create_async_engine(sqlalchemy_url(conninfo), connect_args={
                    "application_name": psycopg.conninfo.conninfo_to_dict(conninfo).get(
                        "application_name", "")})

            engine: AsyncEngine = io(make_engine())
            self._cleanups.append(lambda: io(engine.dispose()))
            return engine if kind == "engine" else async_sessionmaker(engine)
        if kind == "pool":
            async def make_pool() -> psycopg_pool.AsyncConnectionPool[Any]:
                pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
                    conninfo, min_size=1, max_size=1, open=False,
                    timeout=0.5 if unreachable else 30)
                await pool.open(wait=not unreachable)
                return pool

            pool = io(make_pool())
            self._cleanups.append(lambda: io(pool.close()))
            return pool
        if kind == "connection":
            assert not unreachable, "a connection to nowhere cannot be made"
            connection: psycopg.AsyncConnection[Any] = io(
                psycopg.AsyncConnection.connect(conninfo))
            self._cleanups.append(lambda: io(connection.close()))
            return connection
        return conninfo

    def mongo_database(self, url: str, **options: Any) -> Any:
        """A database of a new client of this variant's flavour (closed at the end)."""
        io = self.io
        if self.variant.asyncio:
            async def make() -> AsyncMongoClient[dict[str, Any]]:
                return AsyncMongoClient(url, **{"serverSelectionTimeoutMS": 10_000, **options})

            client: Any = io(make())
            self._cleanups.append(lambda: io(client.close()))
        else:
            client = MongoClient(url, **{"serverSelectionTimeoutMS": 10_000, **options})
            self._cleanups.append(client.close)
        return client.get_default_database()

    # -- running calls ----------------------------------------------------------------------

    def spawn(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `call` on another thread, so that the test can act while it waits."""
        return self._threads.submit(call)

    # -- what a handler does with the handle ------------------------------------------------

    def execute(self, handle: Any, statement: str) -> list[tuple[Any, ...]]:
        """Run SQL on a PostgreSQL handle (Session, AsyncSession, Connection, AsyncConnection)."""
        if isinstance(handle, Session):
            result = handle.execute(text(statement))
            return [tuple(row) for row in result.all()] if result.returns_rows else []
        if isinstance(handle, psycopg.Connection):
            cursor = handle.execute(statement)
            return list(cursor.fetchall()) if cursor.description else []
        return list(self.io(_execute_async(handle, statement)))

    def apply(self, tx: Transaction, n: int) -> None:
        """A handler's write of effect `n` on the transaction's handle."""
        handle = tx.handle
        family = self.variant.family
        if family == "postgres":
            self.execute(handle, f"INSERT INTO {self.effects_table} (n) VALUES ({int(n)})")
        elif family == "mongo":
            # Through the database given to the store: a session works with its own client only.
            effects = tx.store.db[self.effects_table]
            self.io(effects.insert_one({"_id": n}, session=handle))
        else:
            handle.add(n)

    def inbox_seen_through_the_handle(self, tx: Transaction) -> set[uuid.UUID]:
        """The dedup rows of this test's consumer that the handle sees (PostgreSQL, MongoDB)."""
        consumer = self.consumer("billing")
        family = self.variant.family
        if family == "postgres":
            rows = self.execute(tx.handle, "SELECT event_id FROM outbox_inbox"
                                f" WHERE consumer = '{consumer}'")
            return {row[0] for row in rows}
        if family == "mongo":
            cursor = tx.store.db.outbox_inbox.find({"consumer": consumer}, session=tx.handle)
            docs = self.io(cursor.to_list()) if self.variant.asyncio else list(cursor)
            return {doc["event_id"].as_uuid() for doc in docs}
        raise NotImplementedError(self.variant.id)

    def backend_pid(self, tx: Transaction) -> int:
        [(pid,)] = self.execute(tx.handle, "SELECT pg_backend_pid()")
        return int(pid)

    def commit_on_the_handle(self, tx: Transaction) -> None:
        """A handler committing the transaction it was given, as if it owned it."""
        handle = tx.handle
        if self.variant.family == "mongo":
            self.io(handle.commit_transaction())
        else:
            self.io(handle.commit())

    # -- failures ----------------------------------------------------------------------------

    def lose_connection(self, store: Store) -> BaseException:
        """The error a store raises while its server connection is lost, its transaction
        rolled back as the consumer does."""
        family = self.variant.family
        if family == "postgres":
            tx = store.begin()
            pid = self.backend_pid(tx)
            self.outside.terminate(pid)
            try:
                tx.claim([uuid.uuid4()])
            except Exception as exc:
                tx.rollback()  # never raises, even on a dead connection
                return exc
            raise AssertionError("a claim on a terminated connection succeeded")
        if family == "mongo":
            # The shared server cannot drop one client's connections without test commands
            # (failCommand/closeConnection), so this client's server is one nobody listens on.
            unreachable = self.store(unreachable=True)
            try:
                tx = unreachable.begin()
                try:
                    tx.claim([uuid.uuid4()])
                finally:
                    tx.rollback()
            except Exception as exc:
                return exc
            raise AssertionError("a claim on an unreachable server succeeded")
        memory = memory_inbox(store.raw)
        memory.fail_next["claim"] = True  # its stand-in for a lost connection
        tx = store.begin()
        try:
            tx.claim([uuid.uuid4()])
        except Exception as exc:
            tx.rollback()
            return exc
        raise AssertionError("the armed claim failure did not happen")

    def permanent_errors(self, store: Store) -> Iterable[tuple[str, BaseException]]:
        """Real errors that retrying will not cure, each raised in a transaction of `store`
        (with a claim in it) that is then rolled back."""
        family = self.variant.family
        if family == "memory":
            memory = memory_inbox(store.raw)
            memory.reject_commit = lambda effects: True  # its stand-in for a constraint
            tx = store.begin()
            tx.claim([uuid.uuid4()])
            self.apply(tx, 1)
            try:
                tx.commit()
            except RejectedCommitError as exc:
                yield "rejected commit", exc
            finally:
                memory.reject_commit = None
            return
        def apply_twice(tx: Transaction) -> None:
            self.apply(tx, 7)
            self.apply(tx, 7)

        def syntax_error(tx: Transaction) -> None:
            self.execute(tx.handle, "SELEC 1")

        def unknown_operator(tx: Transaction) -> None:
            self.io(tx.store.db[self.effects_table].find_one({"$bogus": 1}, session=tx.handle))

        failures: dict[str, Callable[[Transaction], None]] = (
            {"unique violation": apply_twice, "syntax error": syntax_error}
            if family == "postgres" else
            {"duplicate key": apply_twice, "unknown operator": unknown_operator}
        )
        for name, fail in failures.items():
            tx = store.begin()
            tx.claim([uuid.uuid4()])
            try:
                fail(tx)
            except Exception as exc:
                yield name, exc
            else:
                raise AssertionError(f"{name}: nothing failed")
            finally:
                tx.rollback()

    # -- resources ---------------------------------------------------------------------------

    def assert_callers_resources_intact(self, store: Store) -> None:
        """What the caller gave the store is still open and has nothing borrowed."""
        db, io = store.db, self.io
        kind = self.variant.db
        if kind in ("engine", "sessionmaker"):
            engine = db if isinstance(db, Engine | AsyncEngine) else db.kw["bind"]
            assert engine.pool.checkedout() == 0
        elif kind == "pool":
            # max_size=1: a connection the store kept would make this wait and time out.
            connection = io(db.getconn(timeout=5))
            io(db.putconn(connection))
        elif kind == "connection":
            assert not db.closed
            assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        elif kind == "database":
            assert io(db.command("ping"))["ok"] == 1


def memory_inbox(store: MemoryInbox | AsyncMemoryInbox) -> MemoryInbox:
    """Where an in-memory store keeps its rows, effects and failure switches."""
    return store.inbox if isinstance(store, AsyncMemoryInbox) else store


def _collect_sockets_pymongo_leaked() -> None:
    """AsyncMongoClient's monitor (pymongo 4.20) sometimes drops a socket whose connect was
    refused without closing it; collected later, its ResourceWarning would fail whichever test
    runs then. Collect it here, where it was made, and only its warning is ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def _execute_async(handle: Any, statement: str) -> list[tuple[Any, ...]]:
    if isinstance(handle, AsyncSession):
        result = await handle.execute(text(statement))
        return [tuple(row) for row in result.all()] if result.returns_rows else []
    assert isinstance(handle, psycopg.AsyncConnection)
    cursor = await handle.execute(statement)
    return list(await cursor.fetchall()) if cursor.description else []


def store_methods_are_those_of_the_protocol(store: Any, asyncio: bool) -> list[str]:
    """The Protocol's methods the store lacks or has of the wrong kind (sync/async)."""
    wrong = [] if asyncio or isinstance(store, InboxStore) else ["not an InboxStore"]
    for name, awaited in STORE_METHODS.items():
        method = getattr(store, name, None)
        if method is None or inspect.iscoroutinefunction(method) != (awaited and asyncio):
            wrong.append(name)
    return wrong


def transaction_methods_are_those_of_the_protocol(tx: Any, asyncio: bool) -> list[str]:
    wrong = [] if hasattr(tx, "handle") else ["handle"]
    for name, awaited in TRANSACTION_METHODS.items():
        method = getattr(tx, name, None)
        if method is None or inspect.iscoroutinefunction(method) != (awaited and asyncio):
            wrong.append(name)
    return wrong


# -- looking at the database from outside ---------------------------------------------------


class PostgresOutside:
    """An autocommit connection of the test's own to the store's database."""

    def __init__(self, url: str, harness: Harness) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.harness = harness

    def close(self) -> None:
        self.conn.close()

    def execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []

    def inbox_ids(self, consumer: str = "billing") -> set[uuid.UUID]:
        return {row[0] for row in self.execute(
            "SELECT event_id FROM outbox_inbox WHERE consumer = %s",
            [self.harness.consumer(consumer)])}

    def effects(self) -> list[int]:
        return [row[0] for row in self.execute(
            f"SELECT n FROM {self.harness.effects_table} ORDER BY n")]

    def age_inbox(self, rows: dict[str, list[int]]) -> None:
        """Dedup rows for each consumer, `days` old."""
        for consumer, ages in rows.items():
            for days in ages:
                self.execute("INSERT INTO outbox_inbox (consumer, event_id, processed_at)"
                             " VALUES (%s, %s, now() - %s)",
                             [self.harness.consumer(consumer), uuid.uuid4(),
                              dt.timedelta(days=days)])

    def age_many(self, consumer: str, count: int, days: int) -> None:
        self.execute("INSERT INTO outbox_inbox (consumer, event_id, processed_at)"
                     " SELECT %s, gen_random_uuid(), now() - %s FROM generate_series(1, %s)",
                     [self.harness.consumer(consumer), dt.timedelta(days=days), count])

    def inbox_ages(self) -> list[tuple[str, int]]:
        """(consumer, age in days) of this test's consumers' rows."""
        rows = self.execute(
            "SELECT consumer, round(extract(epoch FROM now() - processed_at) / 86400)"
            " FROM outbox_inbox")
        return sorted((name, int(days)) for consumer, days in rows
                      if (name := self.harness.plain(consumer)) is not None)

    def terminate(self, pid: int) -> None:
        # The timeout makes the call return once the backend is gone, not merely signalled.
        [(done,)] = self.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])
        assert done

    def wait_blocked(self, pid: int, by: int) -> None:
        """Wait until backend `pid` waits for a lock that backend `by` holds."""
        wait_for(lambda: bool(self.execute("SELECT %s = ANY(pg_blocking_pids(%s))",
                                           [by, pid])[0][0]),
                 30, f"backend {pid} to wait for backend {by}")

    def wait_gone(self, application_name: str) -> None:
        wait_for(lambda: self.connections(application_name) == 0, 30,
                 f"the connections of {application_name} to end")

    def connections(self, application_name: str) -> int:
        [(count,)] = self.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name])
        return int(count)


class MongoOutside:
    def __init__(self, database: Any, harness: Harness) -> None:
        self.db = database
        self.harness = harness

    def inbox_ids(self, consumer: str = "billing") -> set[uuid.UUID]:
        named = self.harness.consumer(consumer)
        return {doc["event_id"].as_uuid()
                for doc in self.db.outbox_inbox.find({"consumer": named})}

    def effects(self) -> list[int]:
        return sorted(doc["_id"] for doc in self.db[self.harness.effects_table].find())

    def age_inbox(self, rows: dict[str, list[int]]) -> None:
        now = dt.datetime.now(dt.UTC)
        self.db.outbox_inbox.insert_many([
            {"consumer": self.harness.consumer(consumer),
             "event_id": Binary.from_uuid(uuid.uuid4()),
             "processed_at": now - dt.timedelta(days=days)}
            for consumer, ages in rows.items() for days in ages
        ])

    def age_many(self, consumer: str, count: int, days: int) -> None:
        self.age_inbox({consumer: [days] * count})

    def inbox_ages(self) -> list[tuple[str, int]]:
        now = dt.datetime.now(dt.UTC)
        return sorted(
            (name,
             round((now - doc["processed_at"].replace(tzinfo=dt.UTC)).total_seconds() / 86400))
            for doc in self.db.outbox_inbox.find()
            if (name := self.harness.plain(doc["consumer"])) is not None
        )

    def inbox_indexes(self) -> dict[str, Any]:
        return dict(self.db.outbox_inbox.index_information())


class MemoryOutside:
    def __init__(self, rows: dict[tuple[str, uuid.UUID], dt.datetime],
                 effects: list[Any], harness: Harness) -> None:
        self.rows = rows
        self.committed = effects
        self.harness = harness

    def inbox_ids(self, consumer: str = "billing") -> set[uuid.UUID]:
        named = self.harness.consumer(consumer)
        return {event_id for (owner, event_id) in self.rows if owner == named}

    def effects(self) -> list[int]:
        return sorted(self.committed)

    def age_inbox(self, rows: dict[str, list[int]]) -> None:
        now = dt.datetime.now(dt.UTC)
        for consumer, ages in rows.items():
            for days in ages:
                self.rows[(self.harness.consumer(consumer), uuid.uuid4())] = (
                    now - dt.timedelta(days=days))

    def age_many(self, consumer: str, count: int, days: int) -> None:
        self.age_inbox({consumer: [days] * count})

    def inbox_ages(self) -> list[tuple[str, int]]:
        now = dt.datetime.now(dt.UTC)
        return sorted((name, round((now - at).total_seconds() / 86400))
                      for (consumer, _), at in self.rows.items()
                      if (name := self.harness.plain(consumer)) is not None)


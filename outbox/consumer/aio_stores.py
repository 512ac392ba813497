"""Inbox stores: where the dedup row and the handler's writes go, in one transaction.

One interface (`AsyncInboxStore` / `AsyncInboxTransaction`), one class per driver: SQLAlchemy
(AsyncEngine or async_sessionmaker), psycopg (AsyncConnectionPool, conninfo string or
AsyncConnection) and pymongo (AsyncDatabase); `async_store` picks one for `db=` or `mongo=`.
The decisions on their failures are in `outbox.consumer.store_rules`.

The asyncio stores are the ones written by hand; the synchronous ones (outbox.consumer.stores)
are generated from this file by tools/async_to_sync.py (`make sync-code`).
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import psycopg
import psycopg_pool
from bson import Binary
from psycopg.pq import TransactionStatus
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError
from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError

from outbox import extras
from outbox.conninfo import libpq_url, redact
from outbox.consumer import queries
from outbox.consumer.config import ConsumerConfig
from outbox.consumer.errors import HandlerCommitError, InboxStoreError
from outbox.consumer.sequencing import AggregateKey
from outbox.consumer.store_rules import (
    DEFAULT_INBOX_COLLECTION,
    MONGO_DUPLICATE_KEY,
    PURGE_CHUNK,
    ConcurrentClaim,
    as_uuid,
    mongo_transient,
    pg_transient,
    translate,
)
from outbox.errors import ConfigurationError, UnsupportedTargetError
from outbox.identifiers import check_identifier
from outbox.names import SchemaNames

if True:  # ASYNC
    # (The synchronous branch imports Session: it is what the annotations' AsyncSession becomes.)
    if TYPE_CHECKING:
        # Not imported at run time: it needs greenlet (the `asyncio` extra).
        from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
else:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker  # noqa: F401

log = logging.getLogger("outbox.consumer")


class AsyncInboxTransaction(Protocol):
    """One open database transaction of the consumer."""

    @property
    def handle(self) -> Any:
        """What handlers receive: the AsyncSession, AsyncConnection or AsyncClientSession."""

    async def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Insert the dedup rows of `ids`; returns the ids that were not there yet."""

    async def read_sequences(self, keys: Sequence[AggregateKey]) -> dict[AggregateKey, int]:
        """ordering="sequence": the last applied number of each aggregate that has one, locked
        (or, in MongoDB, written under conflict detection) until the transaction ends."""

    async def save_sequences(self, numbers: Mapping[AggregateKey, int]) -> None:
        """ordering="sequence": store the last applied numbers in this transaction."""

    async def commit(self) -> None: ...

    async def rollback(self) -> None:
        """Roll back and release; never raises (a broken connection is discarded)."""


@runtime_checkable
class AsyncInboxStore(Protocol):
    """A database the consumer applies messages to, with its dedup table."""

    async def check(self) -> None:
        """Fail early (InboxMissingError) when the dedup table is not there."""

    async def begin(self) -> AsyncInboxTransaction: ...

    def is_transient(self, error: BaseException) -> bool:
        """True for failures a retry of the whole transaction may cure."""

    async def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        """Delete dedup rows older than `older_than`; returns how many."""

    async def close(self) -> None: ...


# -- choosing the store ------------------------------------------------------------------------

if True:  # ASYNC
    _OTHER_CONSUMER = "use Consumer for synchronous engines and connections"


    def _is_sqlalchemy(db: Any) -> bool:
        return extras.is_sqlalchemy_asyncio(db)  # AsyncEngine or async_sessionmaker


    def _is_own_store(db: Any) -> bool:
        return isinstance(db, AsyncInboxStore) and inspect.iscoroutinefunction(db.begin)
else:
    _OTHER_CONSUMER = "use AsyncConsumer for asyncio engines and connections"


    def _is_sqlalchemy(db: Any) -> bool:
        return isinstance(db, Engine | sessionmaker)


    def _is_own_store(db: Any) -> bool:
        return isinstance(db, AsyncInboxStore) and not inspect.iscoroutinefunction(db.begin)


def async_store(db: Any, mongo: Any, config: ConsumerConfig) -> AsyncInboxStore:
    """The store for `db=` or `mongo=`, as given to `AsyncConsumer`: the same checks and the
    same errors (UnsupportedTargetError for a wrong type) in the sync and the asyncio consumer."""
    if (db is None) == (mongo is None):
        raise ConfigurationError("pass exactly one of db= (PostgreSQL) and mongo= (MongoDB)")
    store: AsyncInboxStore
    if mongo is not None:
        store = AsyncMongoStore(mongo, config.name, config.inbox_table,
                                sequence=config.ordering == "sequence")
    elif _is_own_store(db):
        # A store of one's own (or outbox.consumer.testing.MemoryInbox).
        store = db
    elif _is_sqlalchemy(db):
        store = AsyncSqlAlchemyStore(db, config.name, config.names,
                                     sequence=config.ordering == "sequence")
    elif isinstance(db, psycopg_pool.AsyncConnectionPool | psycopg.AsyncConnection | str):
        return AsyncPsycopgStore(db, config.name, config.names, pipeline=config.pipeline,
                                 sequence=config.ordering == "sequence")
    else:
        raise UnsupportedTargetError(
            "db= must be a SQLAlchemy AsyncEngine or async_sessionmaker, a "
            "psycopg_pool.AsyncConnectionPool, a psycopg AsyncConnection or a conninfo string, "
            f"not {type(db).__name__} ({_OTHER_CONSUMER})"
        )
    if config.pipeline:
        raise ConfigurationError("pipeline=True needs a psycopg database (pool or conninfo)")
    return store


# -- SQLAlchemy --------------------------------------------------------------------------------


class CommitGuard:
    """Refuses a handler's own `session.commit()`: it would commit part of a batch (with the
    dedup rows of messages whose offsets are not committed, and of later ones not yet applied)."""

    def __init__(self, session: Any) -> None:
        self.armed = True
        event.listen(session, "before_commit", self._before_commit)

    def _before_commit(self, session: Any) -> None:
        if self.armed:
            raise HandlerCommitError()


class _AsyncSqlAlchemyTransaction:
    def __init__(self, session: AsyncSession, store: AsyncSqlAlchemyStore) -> None:
        self._session = session
        self._claim = store.claim_sql
        self._consumer = store.consumer
        self._names = store.names
        if True:  # ASYNC
            # SQLAlchemy's events are the synchronous Session's, under the AsyncSession.
            self._guard = CommitGuard(session.sync_session)
        else:
            self._guard = CommitGuard(session)

    @property
    def handle(self) -> AsyncSession:
        return self._session

    async def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        result = await self._session.execute(
            text(self._claim), {"consumer": self._consumer, "ids": list(ids)}
        )
        return {as_uuid(row[0]) for row in result.all()}

    async def read_sequences(self, keys: Sequence[AggregateKey]) -> dict[AggregateKey, int]:
        result = await self._session.execute(
            text(queries.read_sequences(self._names, sqlalchemy=True)),
            queries.sequence_parameters(self._consumer, keys),
        )
        return {(row[0], row[1]): int(row[2]) for row in result.all()}

    async def save_sequences(self, numbers: Mapping[AggregateKey, int]) -> None:
        await self._session.execute(
            text(queries.save_sequences(self._names, sqlalchemy=True)),
            queries.sequence_parameters(self._consumer, list(numbers), list(numbers.values())),
        )

    async def commit(self) -> None:
        self._guard.armed = False
        try:
            await self._session.commit()
        finally:
            await self._session.close()

    async def rollback(self) -> None:
        try:
            await self._session.rollback()
        except SQLAlchemyError as exc:
            log.debug("rollback failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            try:
                await self._session.close()
            except SQLAlchemyError:
                log.debug("session close failed", extra={"event": "close_failed"})


class AsyncSqlAlchemyStore:
    """Handlers get a SQLAlchemy `AsyncSession` whose transaction also holds the dedup rows."""

    def __init__(
        self, db: AsyncEngine | async_sessionmaker[AsyncSession], consumer: str,
        names: SchemaNames, *, sequence: bool = False,
    ) -> None:
        if not _is_sqlalchemy(db):
            raise UnsupportedTargetError(
                "db must be a SQLAlchemy AsyncEngine or async_sessionmaker, not "
                f"{type(db).__name__} ({_OTHER_CONSUMER})"
            )
        if True:  # ASYNC
            layer = extras.sqlalchemy_asyncio()  # a clear error when greenlet is missing
            self._sessions: async_sessionmaker[AsyncSession] = (
                layer.async_sessionmaker(db) if isinstance(db, layer.AsyncEngine)
                else cast("async_sessionmaker[AsyncSession]", db)
            )
        else:
            self._sessions = sessionmaker(db) if isinstance(db, Engine) else db
        self.consumer = consumer
        self.names = names
        self.claim_sql = queries.claim(names, sqlalchemy=True)
        self._sequence = sequence

    async def check(self) -> None:
        try:
            async with self._sessions() as session:
                await session.execute(text(queries.check(self.names)))
                if self._sequence:
                    await session.execute(text(queries.check_sequences(self.names)))
        except SQLAlchemyError as exc:
            raise translate(exc, "reading the inbox table") from exc

    async def begin(self) -> AsyncInboxTransaction:
        return _AsyncSqlAlchemyTransaction(self._sessions(), self)

    def is_transient(self, error: BaseException) -> bool:
        return pg_transient(error)

    async def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        statement = text(queries.purge(self.names, sqlalchemy=True))
        total = 0
        while True:
            async with self._sessions() as session, session.begin():
                result = await session.execute(
                    statement,
                    {"older_than": older_than, "consumer": consumer, "limit": PURGE_CHUNK},
                )
                deleted = int(getattr(result, "rowcount", 0) or 0)
            total += deleted
            if deleted < PURGE_CHUNK:
                return total

    async def close(self) -> None:
        """The engine belongs to the application: nothing to close."""


# -- psycopg -----------------------------------------------------------------------------------


class _AsyncPsycopgTransaction:
    def __init__(self, store: AsyncPsycopgStore, conn: psycopg.AsyncConnection[Any]) -> None:
        self._store = store
        self._conn = conn
        self._pipeline = conn.pipeline() if store.pipeline else None
        # A transaction block: a handler's own conn.commit() raises instead of committing
        # half a batch; its `with conn.transaction():` becomes a savepoint.
        self._block = conn.transaction()

    async def open(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.__aenter__()
        try:
            await self._block.__aenter__()
        except BaseException:
            await self._end_pipeline()
            raise

    async def _end_pipeline(self) -> None:
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            try:
                await pipeline.__aexit__(None, None, None)
            except psycopg.Error as exc:
                log.debug("pipeline exit failed", extra={"event": "pipeline_failed",
                                                         "error": str(exc)})

    @property
    def handle(self) -> psycopg.AsyncConnection[Any]:
        return self._conn

    async def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        cursor = await self._conn.execute(
            self._store.claim_sql, {"consumer": self._store.consumer, "ids": list(ids)}
        )
        return {row[0] for row in await cursor.fetchall()}

    async def read_sequences(self, keys: Sequence[AggregateKey]) -> dict[AggregateKey, int]:
        store = self._store
        cursor = await self._conn.execute(
            queries.read_sequences(store.names), queries.sequence_parameters(store.consumer, keys))
        return {(row[0], row[1]): int(row[2]) for row in await cursor.fetchall()}

    async def save_sequences(self, numbers: Mapping[AggregateKey, int]) -> None:
        store = self._store
        await self._conn.execute(
            queries.save_sequences(store.names),
            queries.sequence_parameters(store.consumer, list(numbers), list(numbers.values())),
        )

    async def commit(self) -> None:
        try:
            await self._block.__aexit__(None, None, None)
            if self._pipeline is not None:
                pipeline, self._pipeline = self._pipeline, None
                await pipeline.__aexit__(None, None, None)
        finally:
            await self._end_pipeline()
            await self._store.release(self._conn)

    async def rollback(self) -> None:
        try:
            await self._block.__aexit__(psycopg.Rollback, psycopg.Rollback(), None)
        except psycopg.Error as exc:
            log.debug("rollback failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            await self._end_pipeline()
            await self._store.release(self._conn)


class AsyncPsycopgStore:
    """Handlers get the psycopg `AsyncConnection` whose transaction also holds the dedup rows.

    `db` is a `psycopg_pool.AsyncConnectionPool` (a connection is borrowed per transaction), a
    conninfo/URL string (the store keeps one connection and reconnects when it breaks) or a
    `psycopg.AsyncConnection` owned by the caller.
    """

    def __init__(
        self,
        db: psycopg_pool.AsyncConnectionPool[Any] | psycopg.AsyncConnection[Any] | str,
        consumer: str,
        names: SchemaNames,
        *,
        pipeline: bool = False,
        sequence: bool = False,
    ) -> None:
        if not isinstance(db, psycopg_pool.AsyncConnectionPool | psycopg.AsyncConnection | str):
            raise UnsupportedTargetError(
                "db must be a psycopg_pool.AsyncConnectionPool, a psycopg AsyncConnection or a "
                f"conninfo string, not {type(db).__name__} ({_OTHER_CONSUMER})"
            )
        self._pool = db if isinstance(db, psycopg_pool.AsyncConnectionPool) else None
        self._conninfo = libpq_url(db) if isinstance(db, str) else None
        self._conn: psycopg.AsyncConnection[Any] | None = (
            db if isinstance(db, psycopg.AsyncConnection) else None
        )
        self.consumer = consumer
        self.names = names
        self.claim_sql = queries.claim(names)
        self.pipeline = pipeline
        self._sequence = sequence

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._pool is not None:
            conn: psycopg.AsyncConnection[Any] = await self._pool.getconn()
            return conn
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conninfo is None:
                raise InboxStoreError("the psycopg connection given as db= is closed or broken")
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, connect_timeout=10)
        return self._conn

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._pool is not None:
            await self._pool.putconn(conn)
        elif conn.broken and self._conninfo is not None:
            await conn.close()

    async def check(self) -> None:
        try:
            conn = await self._connect()
        except psycopg.Error as exc:
            raise InboxStoreError(f"cannot connect to the database: {redact(str(exc))}") from exc
        try:
            async with conn.transaction():
                await conn.execute(queries.check(self.names))
                if self._sequence:
                    await conn.execute(queries.check_sequences(self.names))
        except psycopg.Error as exc:
            raise translate(exc, "reading the inbox table") from exc
        finally:
            await self.release(conn)

    async def begin(self) -> AsyncInboxTransaction:
        conn = await self._connect()
        if conn.info.transaction_status != TransactionStatus.IDLE:
            # A caller-owned connection left in a transaction: never commit someone else's work.
            await self.release(conn)
            raise InboxStoreError("the database connection is already inside a transaction")
        tx = _AsyncPsycopgTransaction(self, conn)
        try:
            await tx.open()
        except BaseException:
            await self.release(conn)
            raise
        return tx

    def is_transient(self, error: BaseException) -> bool:
        return pg_transient(error)

    async def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        statement = queries.purge(self.names)
        total = 0
        while True:
            conn = await self._connect()
            try:
                async with conn.transaction():
                    cursor = await conn.execute(
                        statement,
                        {"older_than": older_than, "consumer": consumer, "limit": PURGE_CHUNK},
                    )
                    deleted = cursor.rowcount
            finally:
                await self.release(conn)
            total += max(deleted, 0)
            if deleted < PURGE_CHUNK:
                return total

    async def close(self) -> None:
        if self._conninfo is not None and self._conn is not None:
            await self._conn.close()


# -- pymongo -----------------------------------------------------------------------------------

if True:  # ASYNC

    async def _maybe_await(value: Any) -> Any:
        # AsyncMongoClient.start_session() is a coroutine in some pymongo releases, not in others.
        return await value if inspect.isawaitable(value) else value


class _AsyncMongoTransaction:
    def __init__(self, session: AsyncClientSession, inbox: AsyncCollection[Any],
                 sequences: AsyncCollection[Any], consumer: str) -> None:
        self._session = session
        self._inbox = inbox
        self._sequences = sequences
        self._consumer = consumer
        # The handler gets the session: its own commit_transaction() would commit part of a
        # batch (with the dedup rows of messages not yet applied). Refused, as CommitGuard
        # refuses SQLAlchemy's; the store commits through the method it kept.
        self._commit_transaction = session.commit_transaction
        session.commit_transaction = self._refuse_commit  # type: ignore[method-assign]

    @property
    def handle(self) -> AsyncClientSession:
        return self._session

    async def _refuse_commit(self) -> None:
        raise HandlerCommitError()

    async def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        # A duplicate-key error aborts a MongoDB transaction, so the batch looks first and
        # inserts only what is new; the unique index still decides a race with another
        # consumer (DuplicateKeyError -> the whole transaction is retried, then skips it).
        keys = [Binary.from_uuid(event_id) for event_id in ids]
        cursor = self._inbox.find(
            {"consumer": self._consumer, "event_id": {"$in": keys}},
            {"event_id": 1, "_id": 0},
            session=self._session,
        )
        seen = {as_uuid(doc["event_id"]) async for doc in cursor}
        # Each new id once (a repeated one would hit the unique index within this insert).
        new = list(dict.fromkeys(event_id for event_id in ids if event_id not in seen))
        if new:
            now = dt.datetime.now(dt.UTC)
            try:
                await self._inbox.insert_many(
                    [{"consumer": self._consumer, "event_id": Binary.from_uuid(event_id),
                      "processed_at": now} for event_id in new],
                    ordered=True,
                    session=self._session,
                )
            except DuplicateKeyError as exc:
                raise ConcurrentClaim(str(exc)) from exc
            except BulkWriteError as exc:
                # insert_many reports a duplicate key (another consumer claimed an id first)
                # as a bulk write error, not as DuplicateKeyError.
                codes = {error.get("code") for error in exc.details.get("writeErrors", [])}
                if codes == {MONGO_DUPLICATE_KEY}:
                    raise ConcurrentClaim(str(exc)) from exc
                raise
            except OperationFailure as exc:
                if exc.code == MONGO_DUPLICATE_KEY:
                    raise ConcurrentClaim(str(exc)) from exc
                raise
        return set(new)

    async def read_sequences(self, keys: Sequence[AggregateKey]) -> dict[AggregateKey, int]:
        # No lock to take: two transactions that both advance an aggregate write its document,
        # and MongoDB aborts one of them (a write conflict, retried as transient).
        cursor = self._sequences.find(
            {"consumer": self._consumer,
             "$or": [{"aggregate_type": t, "aggregate_id": i} for t, i in keys]},
            {"aggregate_type": 1, "aggregate_id": 1, "last_sequence": 1, "_id": 0},
            session=self._session,
        )
        return {(doc["aggregate_type"], doc["aggregate_id"]): int(doc["last_sequence"])
                async for doc in cursor}

    async def save_sequences(self, numbers: Mapping[AggregateKey, int]) -> None:
        for (aggregate_type, aggregate_id), number in sorted(numbers.items()):
            await self._sequences.update_one(
                {"consumer": self._consumer, "aggregate_type": aggregate_type,
                 "aggregate_id": aggregate_id},
                {"$max": {"last_sequence": number}},
                upsert=True,
                session=self._session,
            )

    async def commit(self) -> None:
        try:
            await self._commit_transaction()
        finally:
            await self._session.end_session()

    async def rollback(self) -> None:
        try:
            if self._session.in_transaction:
                await self._session.abort_transaction()
        except PyMongoError as exc:
            log.debug("abort failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            await self._session.end_session()


class AsyncMongoStore:
    """Handlers get the `AsyncClientSession` of a multi-document transaction that also inserts
    the dedup document; pass `session=` to every write that must be atomic with it."""

    def __init__(self, db: AsyncDatabase[Any], consumer: str,
                 collection: str = DEFAULT_INBOX_COLLECTION, *, sequence: bool = False) -> None:
        if not isinstance(db, AsyncDatabase):
            raise UnsupportedTargetError(
                f"mongo= must be a pymongo AsyncDatabase, not {type(db).__name__} "
                f"({_OTHER_CONSUMER})"
            )
        check_identifier(collection, "inbox_table")
        self._db = db
        self._inbox: AsyncCollection[Any] = db[collection]
        # ordering="sequence": the last applied number per aggregate (`<collection>_sequence`).
        self._sequences: AsyncCollection[Any] = db[f"{collection}_sequence"]
        self._sequence = sequence
        self._consumer = consumer

    async def check(self) -> None:
        # MongoDB has no migrations: the indexes are created here, idempotently.
        try:
            await self._inbox.create_index(
                [("consumer", 1), ("event_id", 1)], unique=True, name="consumer_event_id"
            )
            await self._inbox.create_index([("processed_at", 1)], name="processed_at")
            if self._sequence:
                await self._sequences.create_index(
                    [("consumer", 1), ("aggregate_type", 1), ("aggregate_id", 1)],
                    unique=True, name="consumer_aggregate",
                )
        except PyMongoError as exc:
            raise InboxStoreError(f"creating the inbox indexes failed: {exc}") from exc

    async def begin(self) -> AsyncInboxTransaction:
        if True:  # ASYNC
            session: AsyncClientSession = await _maybe_await(self._db.client.start_session())
        else:
            session = self._db.client.start_session()
        try:
            await session.start_transaction()
        except BaseException:
            await session.end_session()
            raise
        return _AsyncMongoTransaction(session, self._inbox, self._sequences, self._consumer)

    def is_transient(self, error: BaseException) -> bool:
        return mongo_transient(error)

    async def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        query: dict[str, Any] = {"processed_at": {"$lt": dt.datetime.now(dt.UTC) - older_than}}
        if consumer is not None:
            query["consumer"] = consumer
        result = await self._inbox.delete_many(query)
        return int(result.deleted_count)

    async def close(self) -> None:
        """The client belongs to the application: nothing to close."""

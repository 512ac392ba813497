# Generated from outbox/consumer/aio_stores.py by tools/async_to_sync.py (`make sync-code`).
# Do not edit: edit the original and regenerate; `make test` fails while they differ.
"""Inbox stores of the synchronous consumer: where the dedup row and the
handler's writes go, in one transaction.

One interface (`InboxStore` / `InboxTransaction`), one class per driver: SQLAlchemy (Engine or
sessionmaker), psycopg (ConnectionPool, conninfo string or Connection) and pymongo (Database);
`sync_store` picks one for `db=` or `mongo=`. The decisions on their failures are in
`outbox.consumer.store_rules`. Generated from the asyncio stores, `outbox.consumer.aio_stores`.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import psycopg
import psycopg_pool
from bson import Binary
from psycopg.pq import TransactionStatus
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from outbox.conninfo import libpq_url, redact
from outbox.consumer import queries
from outbox.consumer.config import ConsumerConfig
from outbox.consumer.errors import HandlerCommitError, InboxStoreError
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

log = logging.getLogger("outbox.consumer")


class InboxTransaction(Protocol):
    """One open database transaction of the consumer."""

    @property
    def handle(self) -> Any:
        """What handlers receive: the Session, Connection or ClientSession."""

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Insert the dedup rows of `ids`; returns the ids that were not there yet."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Roll back and release; never raises (a broken connection is discarded)."""


@runtime_checkable
class InboxStore(Protocol):
    """A database the consumer applies messages to, with its dedup table."""

    def check(self) -> None:
        """Fail early (InboxMissingError) when the dedup table is not there."""

    def begin(self) -> InboxTransaction: ...

    def is_transient(self, error: BaseException) -> bool:
        """True for failures a retry of the whole transaction may cure."""

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        """Delete dedup rows older than `older_than`; returns how many."""

    def close(self) -> None: ...


# -- choosing the store ------------------------------------------------------------------------

_OTHER_CONSUMER = "use AsyncConsumer for asyncio engines and connections"


def _is_sqlalchemy(db: Any) -> bool:
    return isinstance(db, Engine | sessionmaker)


def _is_own_store(db: Any) -> bool:
    return isinstance(db, InboxStore) and not inspect.iscoroutinefunction(db.begin)


def sync_store(db: Any, mongo: Any, config: ConsumerConfig) -> InboxStore:
    """The store for `db=` or `mongo=`, as given to `Consumer`: the same checks and the
    same errors (UnsupportedTargetError for a wrong type) in the sync and the asyncio consumer."""
    if (db is None) == (mongo is None):
        raise ConfigurationError("pass exactly one of db= (PostgreSQL) and mongo= (MongoDB)")
    store: InboxStore
    if mongo is not None:
        store = MongoStore(mongo, config.name, config.inbox_table)
    elif _is_own_store(db):
        # A store of one's own (or outbox.consumer.testing.MemoryInbox).
        store = db
    elif _is_sqlalchemy(db):
        store = SqlAlchemyStore(db, config.name, config.names)
    elif isinstance(db, psycopg_pool.ConnectionPool | psycopg.Connection | str):
        return PsycopgStore(db, config.name, config.names, pipeline=config.pipeline)
    else:
        raise UnsupportedTargetError(
            "db= must be a SQLAlchemy Engine or sessionmaker, a "
            "psycopg_pool.ConnectionPool, a psycopg Connection or a conninfo string, "
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


class _SqlAlchemyTransaction:
    def __init__(self, session: Session, claim_sql: str, consumer: str) -> None:
        self._session = session
        self._claim = claim_sql
        self._consumer = consumer
        self._guard = CommitGuard(session)

    @property
    def handle(self) -> Session:
        return self._session

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        result = self._session.execute(
            text(self._claim), {"consumer": self._consumer, "ids": list(ids)}
        )
        return {as_uuid(row[0]) for row in result.all()}

    def commit(self) -> None:
        self._guard.armed = False
        try:
            self._session.commit()
        finally:
            self._session.close()

    def rollback(self) -> None:
        try:
            self._session.rollback()
        except SQLAlchemyError as exc:
            log.debug("rollback failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            try:
                self._session.close()
            except SQLAlchemyError:
                log.debug("session close failed", extra={"event": "close_failed"})


class SqlAlchemyStore:
    """Handlers get a SQLAlchemy `Session` whose transaction also holds the dedup rows."""

    def __init__(
        self, db: Engine | sessionmaker[Session], consumer: str,
        names: SchemaNames,
    ) -> None:
        if not _is_sqlalchemy(db):
            raise UnsupportedTargetError(
                "db must be a SQLAlchemy Engine or sessionmaker, not "
                f"{type(db).__name__} ({_OTHER_CONSUMER})"
            )
        self._sessions = sessionmaker(db) if isinstance(db, Engine) else db
        self._consumer = consumer
        self._names = names
        self._claim = queries.claim(names, sqlalchemy=True)

    def check(self) -> None:
        try:
            with self._sessions() as session:
                session.execute(text(queries.check(self._names)))
        except SQLAlchemyError as exc:
            raise translate(exc, "reading the inbox table") from exc

    def begin(self) -> InboxTransaction:
        return _SqlAlchemyTransaction(self._sessions(), self._claim, self._consumer)

    def is_transient(self, error: BaseException) -> bool:
        return pg_transient(error)

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        statement = text(queries.purge(self._names, sqlalchemy=True))
        total = 0
        while True:
            with self._sessions() as session, session.begin():
                result = session.execute(
                    statement,
                    {"older_than": older_than, "consumer": consumer, "limit": PURGE_CHUNK},
                )
                deleted = int(getattr(result, "rowcount", 0) or 0)
            total += deleted
            if deleted < PURGE_CHUNK:
                return total

    def close(self) -> None:
        """The engine belongs to the application: nothing to close."""


# -- psycopg -----------------------------------------------------------------------------------


class _PsycopgTransaction:
    def __init__(self, store: PsycopgStore, conn: psycopg.Connection[Any]) -> None:
        self._store = store
        self._conn = conn
        self._pipeline = conn.pipeline() if store.pipeline else None
        # A transaction block: a handler's own conn.commit() raises instead of committing
        # half a batch; its `with conn.transaction():` becomes a savepoint.
        self._block = conn.transaction()

    def open(self) -> None:
        if self._pipeline is not None:
            self._pipeline.__enter__()
        try:
            self._block.__enter__()
        except BaseException:
            self._end_pipeline()
            raise

    def _end_pipeline(self) -> None:
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            try:
                pipeline.__exit__(None, None, None)
            except psycopg.Error as exc:
                log.debug("pipeline exit failed", extra={"event": "pipeline_failed",
                                                         "error": str(exc)})

    @property
    def handle(self) -> psycopg.Connection[Any]:
        return self._conn

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        cursor = self._conn.execute(
            self._store.claim_sql, {"consumer": self._store.consumer, "ids": list(ids)}
        )
        return {row[0] for row in cursor.fetchall()}

    def commit(self) -> None:
        try:
            self._block.__exit__(None, None, None)
            if self._pipeline is not None:
                pipeline, self._pipeline = self._pipeline, None
                pipeline.__exit__(None, None, None)
        finally:
            self._end_pipeline()
            self._store.release(self._conn)

    def rollback(self) -> None:
        try:
            self._block.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
        except psycopg.Error as exc:
            log.debug("rollback failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            self._end_pipeline()
            self._store.release(self._conn)


class PsycopgStore:
    """Handlers get the psycopg `Connection` whose transaction also holds the dedup rows.

    `db` is a `psycopg_pool.ConnectionPool` (a connection is borrowed per transaction), a
    conninfo/URL string (the store keeps one connection and reconnects when it breaks) or a
    `psycopg.Connection` owned by the caller.
    """

    def __init__(
        self,
        db: psycopg_pool.ConnectionPool[Any] | psycopg.Connection[Any] | str,
        consumer: str,
        names: SchemaNames,
        *,
        pipeline: bool = False,
    ) -> None:
        if not isinstance(db, psycopg_pool.ConnectionPool | psycopg.Connection | str):
            raise UnsupportedTargetError(
                "db must be a psycopg_pool.ConnectionPool, a psycopg Connection or a "
                f"conninfo string, not {type(db).__name__} ({_OTHER_CONSUMER})"
            )
        self._pool = db if isinstance(db, psycopg_pool.ConnectionPool) else None
        self._conninfo = libpq_url(db) if isinstance(db, str) else None
        self._conn: psycopg.Connection[Any] | None = (
            db if isinstance(db, psycopg.Connection) else None
        )
        self.consumer = consumer
        self._names = names
        self.claim_sql = queries.claim(names)
        self.pipeline = pipeline

    def _connect(self) -> psycopg.Connection[Any]:
        if self._pool is not None:
            conn: psycopg.Connection[Any] = self._pool.getconn()
            return conn
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conninfo is None:
                raise InboxStoreError("the psycopg connection given as db= is closed or broken")
            self._conn = psycopg.Connection.connect(self._conninfo, connect_timeout=10)
        return self._conn

    def release(self, conn: psycopg.Connection[Any]) -> None:
        if self._pool is not None:
            self._pool.putconn(conn)
        elif conn.broken and self._conninfo is not None:
            conn.close()

    def check(self) -> None:
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            raise InboxStoreError(f"cannot connect to the database: {redact(str(exc))}") from exc
        try:
            with conn.transaction():
                conn.execute(queries.check(self._names))
        except psycopg.Error as exc:
            raise translate(exc, "reading the inbox table") from exc
        finally:
            self.release(conn)

    def begin(self) -> InboxTransaction:
        conn = self._connect()
        if conn.info.transaction_status != TransactionStatus.IDLE:
            # A caller-owned connection left in a transaction: never commit someone else's work.
            self.release(conn)
            raise InboxStoreError("the database connection is already inside a transaction")
        tx = _PsycopgTransaction(self, conn)
        try:
            tx.open()
        except BaseException:
            self.release(conn)
            raise
        return tx

    def is_transient(self, error: BaseException) -> bool:
        return pg_transient(error)

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        statement = queries.purge(self._names)
        total = 0
        while True:
            conn = self._connect()
            try:
                with conn.transaction():
                    cursor = conn.execute(
                        statement,
                        {"older_than": older_than, "consumer": consumer, "limit": PURGE_CHUNK},
                    )
                    deleted = cursor.rowcount
            finally:
                self.release(conn)
            total += max(deleted, 0)
            if deleted < PURGE_CHUNK:
                return total

    def close(self) -> None:
        if self._conninfo is not None and self._conn is not None:
            self._conn.close()


# -- pymongo -----------------------------------------------------------------------------------



class _MongoTransaction:
    def __init__(self, session: ClientSession, inbox: Collection[Any],
                 consumer: str) -> None:
        self._session = session
        self._inbox = inbox
        self._consumer = consumer

    @property
    def handle(self) -> ClientSession:
        return self._session

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        # A duplicate-key error aborts a MongoDB transaction, so the batch looks first and
        # inserts only what is new; the unique index still decides a race with another
        # consumer (DuplicateKeyError -> the whole transaction is retried, then skips it).
        keys = [Binary.from_uuid(event_id) for event_id in ids]
        cursor = self._inbox.find(
            {"consumer": self._consumer, "event_id": {"$in": keys}},
            {"event_id": 1, "_id": 0},
            session=self._session,
        )
        seen = {as_uuid(doc["event_id"]) for doc in cursor}
        new = [event_id for event_id in ids if event_id not in seen]
        if new:
            now = dt.datetime.now(dt.UTC)
            try:
                self._inbox.insert_many(
                    [{"consumer": self._consumer, "event_id": Binary.from_uuid(event_id),
                      "processed_at": now} for event_id in new],
                    ordered=True,
                    session=self._session,
                )
            except DuplicateKeyError as exc:
                raise ConcurrentClaim(str(exc)) from exc
            except OperationFailure as exc:
                if exc.code == MONGO_DUPLICATE_KEY:
                    raise ConcurrentClaim(str(exc)) from exc
                raise
        return set(new)

    def commit(self) -> None:
        try:
            self._session.commit_transaction()
        finally:
            self._session.end_session()

    def rollback(self) -> None:
        try:
            if self._session.in_transaction:
                self._session.abort_transaction()
        except PyMongoError as exc:
            log.debug("abort failed", extra={"event": "rollback_failed", "error": str(exc)})
        finally:
            self._session.end_session()


class MongoStore:
    """Handlers get the `ClientSession` of a multi-document transaction that also inserts
    the dedup document; pass `session=` to every write that must be atomic with it."""

    def __init__(self, db: Database[Any], consumer: str,
                 collection: str = DEFAULT_INBOX_COLLECTION) -> None:
        if not isinstance(db, Database):
            raise UnsupportedTargetError(
                f"mongo= must be a pymongo Database, not {type(db).__name__} "
                f"({_OTHER_CONSUMER})"
            )
        check_identifier(collection, "inbox_table")
        self._db = db
        self._inbox: Collection[Any] = db[collection]
        self._consumer = consumer

    def check(self) -> None:
        # MongoDB has no migrations: the indexes are created here, idempotently.
        try:
            self._inbox.create_index(
                [("consumer", 1), ("event_id", 1)], unique=True, name="consumer_event_id"
            )
            self._inbox.create_index([("processed_at", 1)], name="processed_at")
        except PyMongoError as exc:
            raise InboxStoreError(f"creating the inbox indexes failed: {exc}") from exc

    def begin(self) -> InboxTransaction:
        session = self._db.client.start_session()
        try:
            session.start_transaction()
        except BaseException:
            session.end_session()
            raise
        return _MongoTransaction(session, self._inbox, self._consumer)

    def is_transient(self, error: BaseException) -> bool:
        return mongo_transient(error)

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        query: dict[str, Any] = {"processed_at": {"$lt": dt.datetime.now(dt.UTC) - older_than}}
        if consumer is not None:
            query["consumer"] = consumer
        result = self._inbox.delete_many(query)
        return int(result.deleted_count)

    def close(self) -> None:
        """The client belongs to the application: nothing to close."""

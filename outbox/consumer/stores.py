"""Inbox stores for the synchronous consumer: where the dedup row and the handler's writes go.

One interface (`InboxStore` / `InboxTransaction`), one class per driver: SQLAlchemy (Engine or
sessionmaker) and psycopg (ConnectionPool, conninfo string or Connection). The MongoDB store
lives in `outbox.consumer.mongo`, the asyncio ones in `outbox.consumer.aio_stores`.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from outbox.conninfo import libpq_url, redact
from outbox.consumer import queries
from outbox.consumer.errors import HandlerCommitError, InboxMissingError, InboxStoreError
from outbox.errors import OutboxError, UnsupportedTargetError
from outbox.names import SchemaNames

log = logging.getLogger("outbox.consumer")

UNDEFINED_TABLE = "42P01"
# Worth retrying the whole transaction: serialization failure, deadlock, server shutting down
# or starting, too many connections; class 08 (connection exceptions) is added below.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "53300"})
PURGE_CHUNK = 10_000


class InboxTransaction(Protocol):
    """One open database transaction of the consumer."""

    @property
    def handle(self) -> Any:
        """What handlers receive: a Session, a Connection or a ClientSession."""

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


# -- classifying PostgreSQL errors -----------------------------------------------------------


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(chain) < 10:
        seen.add(id(current))
        chain.append(current)
        if isinstance(current, DBAPIError) and isinstance(current.orig, BaseException):
            chain.append(current.orig)
        current = current.__cause__
    return chain


def sqlstate(error: BaseException) -> str | None:
    for cause in _causes(error):
        state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def pg_transient(error: BaseException) -> bool:
    """Connection lost, server restarting, serialization failure or deadlock."""
    for cause in _causes(error):
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, psycopg_pool.PoolTimeout | ConnectionError):
            return True
        state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if isinstance(state, str) and (state.startswith("08") or state in _TRANSIENT_SQLSTATES):
            return True
        # libpq reports a lost connection without a SQLSTATE.
        if isinstance(cause, psycopg.OperationalError) and state is None:
            return True
    return False


def translate(error: BaseException, what: str) -> OutboxError:
    """A store error that retrying will not cure, as the project's exception."""
    if sqlstate(error) == UNDEFINED_TABLE:
        return InboxMissingError()
    return InboxStoreError(f"{what} failed: {redact(str(error))}")


# -- SQLAlchemy --------------------------------------------------------------------------------


class CommitGuard:
    """Refuses a handler's own `session.commit()`: it would commit part of a batch (with the
    dedup rows of messages whose offsets are not committed, and of later ones not yet applied)."""

    def __init__(self, session: Session) -> None:
        self.armed = True
        event.listen(session, "before_commit", self._before_commit)

    def _before_commit(self, session: Session) -> None:
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
        rows = self._session.execute(
            text(self._claim), {"consumer": self._consumer, "ids": list(ids)}
        ).all()
        return {_as_uuid(row[0]) for row in rows}

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
        self, db: Engine | sessionmaker[Session], consumer: str, names: SchemaNames
    ) -> None:
        self._sessions: sessionmaker[Session] = (
            sessionmaker(db) if isinstance(db, Engine) else db
        )
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
        if self._pipeline is not None:
            self._pipeline.__enter__()
        # A transaction block: a handler's own conn.commit() raises instead of committing
        # half a batch; its `with conn.transaction():` becomes a savepoint.
        self._block = conn.transaction()
        try:
            self._block.__enter__()
        except BaseException:
            self._end_pipeline()
            raise

    @property
    def handle(self) -> psycopg.Connection[Any]:
        return self._conn

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        cursor = self._conn.execute(
            self._store.claim_sql, {"consumer": self._store.consumer, "ids": list(ids)}
        )
        return {row[0] for row in cursor.fetchall()}

    def _end_pipeline(self) -> None:
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            try:
                pipeline.__exit__(None, None, None)
            except psycopg.Error as exc:
                log.debug("pipeline exit failed", extra={"event": "pipeline_failed",
                                                         "error": str(exc)})

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
                f"db must be a SQLAlchemy Engine/sessionmaker, a psycopg ConnectionPool, "
                f"Connection or conninfo string, not {type(db).__name__}"
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
            self._conn = psycopg.connect(self._conninfo, connect_timeout=10)
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
        try:
            return _PsycopgTransaction(self, conn)
        except BaseException:
            self.release(conn)
            raise

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


def _as_uuid(value: Any) -> uuid.UUID:
    # asyncpg returns its own UUID type; make set membership with uuid.UUID exact.
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))

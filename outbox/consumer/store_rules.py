"""What the inbox stores decide without I/O: which database failures a retry of the whole
transaction may cure (PostgreSQL, MongoDB), what the others mean, and the shared constants.
The sync and asyncio stores (`stores.py`, `aio_stores.py`) and the engine ask this module."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import psycopg_pool
from bson import Binary
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError
from sqlalchemy.exc import DBAPIError

from outbox.conninfo import redact
from outbox.consumer.errors import InboxMissingError, InboxStoreError
from outbox.errors import OutboxError

UNDEFINED_TABLE = "42P01"
# Worth retrying the whole transaction: serialization failure, deadlock, server shutting down
# or starting, too many connections; class 08 (connection exceptions) is added below.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "53300"})
# Dedup rows deleted per transaction by a purge: short transactions, no long lock on the table.
PURGE_CHUNK = 10_000
DEFAULT_INBOX_COLLECTION = "outbox_inbox"
_MONGO_TRANSIENT_LABELS = ("TransientTransactionError", "UnknownTransactionCommitResult")
# WriteConflict, and the inbox insert losing a race with another consumer (see claim()).
_MONGO_TRANSIENT_CODES = frozenset({112, 251})
MONGO_DUPLICATE_KEY = 11000


class ConcurrentClaim(Exception):
    """Another consumer committed the same event id between our lookup and our insert."""


# -- PostgreSQL --------------------------------------------------------------------------------


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
    """A store error that retrying will not cure, as the project's exception (an OutboxError
    is already one)."""
    if isinstance(error, OutboxError):
        return error
    if sqlstate(error) == UNDEFINED_TABLE:
        return InboxMissingError()
    return InboxStoreError(f"{what} failed: {redact(str(error))}")


# -- MongoDB -----------------------------------------------------------------------------------


def mongo_transient(error: BaseException) -> bool:
    current: BaseException | None = error
    depth = 0
    while current is not None and depth < 10:
        if isinstance(current, ConcurrentClaim | ConnectionFailure):
            return True
        if isinstance(current, PyMongoError) and any(
            current.has_error_label(label) for label in _MONGO_TRANSIENT_LABELS
        ):
            return True
        if isinstance(current, OperationFailure) and current.code in _MONGO_TRANSIENT_CODES:
            return True
        current, depth = current.__cause__, depth + 1
    return False


def as_uuid(value: Any) -> uuid.UUID:
    """An event id read back from a store: MongoDB's Binary subtype 4, asyncpg's own UUID type
    (set membership with uuid.UUID must be exact), or a UUID already."""
    if type(value) is uuid.UUID:
        return value
    if isinstance(value, Binary):
        return value.as_uuid()
    return uuid.UUID(str(value))

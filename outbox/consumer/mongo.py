"""The MongoDB inbox store: a dedup document with a unique index, in the handler's transaction."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from bson import Binary
from pymongo import ASCENDING, MongoClient
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from outbox.consumer.errors import InboxStoreError
from outbox.identifiers import check_identifier

log = logging.getLogger("outbox.consumer")

DEFAULT_INBOX_COLLECTION = "outbox_inbox"
_TRANSIENT_LABELS = ("TransientTransactionError", "UnknownTransactionCommitResult")
# WriteConflict, and the inbox insert losing a race with another consumer (see claim()).
_TRANSIENT_CODES = frozenset({112, 251})


class ConcurrentClaim(Exception):
    """Another consumer committed the same event id between our lookup and our insert."""


def inbox_indexes(collection: Collection[Any]) -> None:
    """Create the inbox indexes (idempotent): the unique dedup key, and age for purging."""
    collection.create_index(
        [("consumer", ASCENDING), ("event_id", ASCENDING)], unique=True, name="consumer_event_id"
    )
    collection.create_index([("processed_at", ASCENDING)], name="processed_at")


def mongo_transient(error: BaseException) -> bool:
    current: BaseException | None = error
    depth = 0
    while current is not None and depth < 10:
        if isinstance(current, ConcurrentClaim | ConnectionFailure):
            return True
        if isinstance(current, PyMongoError) and any(
            current.has_error_label(label) for label in _TRANSIENT_LABELS
        ):
            return True
        if isinstance(current, OperationFailure) and current.code in _TRANSIENT_CODES:
            return True
        current, depth = current.__cause__, depth + 1
    return False


def as_uuid(value: Any) -> uuid.UUID:
    """An event id read back from MongoDB (Binary subtype 4, or UUID with uuidRepresentation)."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, Binary):
        return value.as_uuid()
    return uuid.UUID(str(value))


class _MongoTransaction:
    def __init__(self, client: MongoClient[Any], inbox: Collection[Any], consumer: str) -> None:
        self._session = client.start_session()
        try:
            self._session.start_transaction()
        except BaseException:
            self._session.end_session()
            raise
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
        seen = {
            as_uuid(doc["event_id"])
            for doc in self._inbox.find(
                {"consumer": self._consumer, "event_id": {"$in": keys}},
                {"event_id": 1, "_id": 0},
                session=self._session,
            )
        }
        new = [event_id for event_id in ids if event_id not in seen]
        if new:
            now = dt.datetime.now(dt.UTC)
            try:
                self._inbox.insert_many(
                    [
                        {"consumer": self._consumer, "event_id": Binary.from_uuid(event_id),
                         "processed_at": now}
                        for event_id in new
                    ],
                    ordered=True,
                    session=self._session,
                )
            except DuplicateKeyError as exc:
                raise ConcurrentClaim(str(exc)) from exc
            except OperationFailure as exc:
                if exc.code == 11000:
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
    """Handlers get the `ClientSession` of a multi-document transaction that also inserts the
    dedup document; pass `session=` to every write that must be atomic with it."""

    def __init__(
        self, db: Database[Any], consumer: str, collection: str = DEFAULT_INBOX_COLLECTION
    ) -> None:
        if not isinstance(db, Database):
            raise InboxStoreError(f"mongo= must be a pymongo Database, not {type(db).__name__}")
        check_identifier(collection, "inbox_table")
        self._db = db
        self._inbox: Collection[Any] = db[collection]
        self._consumer = consumer

    def check(self) -> None:
        # MongoDB has no migrations: the indexes are created here, idempotently.
        try:
            inbox_indexes(self._inbox)
        except PyMongoError as exc:
            raise InboxStoreError(f"creating the inbox indexes failed: {exc}") from exc

    def begin(self) -> _MongoTransaction:
        return _MongoTransaction(self._db.client, self._inbox, self._consumer)

    def is_transient(self, error: BaseException) -> bool:
        return mongo_transient(error)

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        query: dict[str, Any] = {"processed_at": {"$lt": dt.datetime.now(dt.UTC) - older_than}}
        if consumer is not None:
            query["consumer"] = consumer
        return int(self._inbox.delete_many(query).deleted_count)

    def close(self) -> None:
        """The client belongs to the application: nothing to close."""

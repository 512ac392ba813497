"""Every MongoDB operation of the relay sources, behind one interface; pymongo errors end here."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import bson
from pymongo import ASCENDING, DeleteMany, MongoClient, ReplaceOne, UpdateOne
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.errors import (
    CollectionInvalid,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.errors import (
    ConfigurationError as PyMongoConfigurationError,
)

from outbox.conninfo import redact
from outbox.errors import ConfigurationError, InvalidEventError
from outbox.mongo import MAX_DOCUMENT_BYTES, event_id_of
from relay.core.holds import KeyHolds
from relay.errors import FatalRelayError, RelayError, SourceUnavailableError
from relay.mongo.config import MongoRelayConfig
from relay.mongo.errors import ResumeTokenInvalidError
from relay.mongo.tracker import AckPlan, Parking

log = logging.getLogger(__name__)

Document = dict[str, Any]
Token = Mapping[str, Any]

# A change stream cannot resume from the token: InvalidResumeToken, ChangeStreamFatalError
# ("resume token was not found"), ChangeStreamHistoryLost; FailedToParse only counts when the
# stream was opened with a stored token (a foreign or corrupted one).
TOKEN_LOST_CODES = frozenset({260, 280, 286})
TOKEN_UNPARSABLE_CODES = frozenset({9})
# Parked events in the order they were parked (documents from before `seq` by time).
PARKED_ORDER = [("seq", ASCENDING), ("parked_at", ASCENDING)]
# Unauthorized, AuthenticationFailed: a restart cannot cure these, an operator must.
FATAL_CODES = frozenset({13, 18})


class ChangeSource(Protocol):
    """The part of a change stream the relay uses."""

    def try_next(self) -> Mapping[str, Any] | None: ...

    @property
    def resume_token(self) -> Token | None: ...

    @property
    def alive(self) -> bool: ...

    def close(self) -> None: ...


class OutboxStore(Protocol):
    """The MongoDB side of a relay: reading pending events, acknowledging them, and the relay's
    own state (lease, resume token). `relay.mongo.testing.InMemoryStore` is the fake."""

    def page(
        self, collection: str, id_filter: Mapping[str, Any], limit: int, *, embedded: bool
    ) -> list[Mapping[str, Any]]:
        """Up to `limit` documents with pending events, in _id order, matching `id_filter`."""

    def apply(self, plan: AckPlan) -> None:
        """Park `plan.parks`, then remove every entry of the plan from its document."""

    def held_keys(self) -> KeyHolds:
        """The keys with parked events, each held behind its first (read at start-up)."""

    def try_lease(self, owner: str, ttl: float) -> bool:
        """Take or renew the relay lease for `ttl` seconds; False if another owner holds it."""

    def release_lease(self, owner: str) -> None: ...

    def load_token(self) -> Token | None: ...

    def save_token(self, token: Token) -> None: ...

    def clear_token(self) -> None: ...

    def watch(self, resume_after: Token | None, max_await: float) -> ChangeSource:
        """A change stream over the relayed collections, after `resume_after` or from now."""

    def close(self) -> None: ...


@contextmanager
def translated(action: str, *, token_given: bool = False) -> Iterator[None]:
    """pymongo errors -> the relay's: retryable unless only an operator can help."""
    try:
        yield
    except RelayError:
        raise
    except PyMongoConfigurationError as exc:
        raise ConfigurationError(f"MongoDB configuration: {redact(str(exc))}") from exc
    except OperationFailure as exc:
        codes = TOKEN_LOST_CODES | (TOKEN_UNPARSABLE_CODES if token_given else frozenset())
        if exc.code in codes:
            raise ResumeTokenInvalidError(
                f"{action}: the resume token cannot be used ({exc.code}: "
                f"{redact(str(exc.details.get('errmsg', exc)) if exc.details else str(exc))})"
            ) from exc
        if exc.code in FATAL_CODES:
            raise FatalRelayError(
                f"{action}: MongoDB refused ({redact(str(exc))}); check the relay's user and "
                "roles (it needs find/update on the collections, insert on the parked "
                "collection, and read/write on the state collection)"
            ) from exc
        raise SourceUnavailableError(f"{action}: {redact(str(exc))}") from exc
    except ConnectionFailure as exc:
        raise SourceUnavailableError(f"{action}: MongoDB unreachable: {redact(str(exc))}") from exc
    except PyMongoError as exc:
        raise SourceUnavailableError(f"{action}: {redact(str(exc))}") from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Stream:
    """A pymongo change stream whose errors are translated."""

    def __init__(self, stream: ChangeStream[Document], token_given: bool) -> None:
        self._stream = stream
        self._token_given = token_given

    def try_next(self) -> Mapping[str, Any] | None:
        with translated("reading the change stream", token_given=self._token_given):
            change = self._stream.try_next()
        # A token that was accepted once keeps working; later parse errors are not about it.
        self._token_given = False
        return change

    @property
    def resume_token(self) -> Token | None:
        return self._stream.resume_token

    @property
    def alive(self) -> bool:
        return self._stream.alive

    def close(self) -> None:
        try:
            self._stream.close()
        except PyMongoError as exc:
            log.debug("closing the change stream failed", extra={
                "event": "change_stream_close_failed", "error": redact(str(exc))})


class MongoStore:
    """OutboxStore on pymongo. Uses the default codec options, so stored ids come back as
    `bson.Binary` and are sent back in `$pull` exactly as they were stored."""

    def __init__(self, config: MongoRelayConfig) -> None:
        self.config = config
        timeout_ms = int(config.server_timeout * 1000)
        with translated("connecting to MongoDB"):
            self.client: MongoClient[Document] = MongoClient(
                config.url,
                appname="outbox-relay",
                tz_aware=True,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
            )
        self.db = self.client[config.database]
        self.state: Collection[Document] = self.db[config.state_collection]
        self.parked: Collection[Document] = self.db[config.parked_collection]
        self._park_seq = 0

    def __enter__(self) -> MongoStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    # -- start-up ------------------------------------------------------------------------------

    def check(self, *, stream: bool) -> None:
        """Fail fast on a wrong setup; create the outbox collection and the pending index."""
        with translated("checking MongoDB"):
            hello = self.db.command("hello")
        if stream and not (hello.get("setName") or hello.get("msg") == "isdbgrid"):
            raise FatalRelayError(
                "mongo-stream needs change streams, which need a replica set or a sharded "
                "cluster; this server is standalone (start it with --replSet, or use "
                "--source mongo-poll)"
            )
        if self.config.create_indexes:
            self._ensure_collections()

    def _ensure_collections(self) -> None:
        config = self.config
        pending_key = f"{config.field}.id"
        try:
            with translated("creating the relay's collections and indexes"):
                existing = set(self.db.list_collection_names())
                for name in (config.outbox_collection, config.parked_collection):
                    if name not in existing:
                        # Created up front: two application transactions that create the
                        # outbox collection implicitly at once conflict.
                        with contextlib.suppress(CollectionInvalid):  # created concurrently
                            self.db.create_collection(name)
                for name in config.collections:
                    # Partial, on the small ids only: the index holds pending documents alone
                    # and never the payloads, and `{field.id: {$exists: true}}` can use it.
                    self.db[name].create_index(
                        [(pending_key, ASCENDING)],
                        name=f"{config.field}_pending",
                        partialFilterExpression={pending_key: {"$exists": True}},
                    )
        except FatalRelayError as exc:
            log.warning("cannot create the outbox collection or the pending index; reading "
                        "without them", extra={"event": "mongo_setup_skipped", "error": str(exc)})
        except SourceUnavailableError as exc:
            if not isinstance(exc.__cause__, OperationFailure):
                raise
            # e.g. an index of that name with other options: the operator's choice stands.
            log.warning("pending-events index not created", extra={
                "event": "mongo_index_skipped", "error": str(exc)})

    # -- pending events ----------------------------------------------------------------------

    def page(
        self, collection: str, id_filter: Mapping[str, Any], limit: int, *, embedded: bool
    ) -> list[Mapping[str, Any]]:
        query: dict[str, Any] = dict(id_filter)
        projection: dict[str, int] | None = None
        if embedded:
            query[f"{self.config.field}.id"] = {"$exists": True}
            # The business fields are not needed: reading only the list keeps pages small.
            projection = {self.config.field: 1}
        with translated(f"reading pending events of {collection}"):
            cursor = self.db[collection].find(
                query, projection, sort=[("_id", ASCENDING)], limit=limit, batch_size=limit
            )
            # Read the whole page before anything is acknowledged: an entry seen here is
            # either still pending or known to the relay as sent.
            return list(cursor)

    def apply(self, plan: AckPlan) -> None:
        if plan.parks:
            with translated("parking events"):
                self.parked.bulk_write(
                    [ReplaceOne({"_id": p.ref.event_id}, self._parked_document(p), upsert=True)
                     for p in plan.parks],
                    ordered=False,
                )
        by_collection: dict[str, list[UpdateOne]] = {}
        list_field = self.config.field
        for (collection, _), (document_id, event_ids) in plan.pulls.items():
            by_collection.setdefault(collection, []).append(UpdateOne(
                {"_id": document_id},
                # By id, never by position: entries appended since the read stay. The marker
                # tells the change stream that this write added nothing.
                {"$pull": {list_field: {"id": {"$in": event_ids}}},
                 "$currentDate": {self.config.marker_field: True}},
            ))
        for collection, updates in by_collection.items():
            with translated(f"removing published events from {collection}"):
                self.db[collection].bulk_write(updates, ordered=False)
        for collection, ids in plan.deletes.items():
            with translated(f"deleting published events from {collection}"):
                self.db[collection].bulk_write([DeleteMany({"_id": {"$in": ids}})])

    def held_keys(self) -> KeyHolds:
        with translated("reading the parked events' keys"):
            documents = list(self.parked.find(
                {"entry.aggregate_type": {"$exists": True}},
                {"entry.aggregate_type": 1, "entry.aggregate_id": 1},
                sort=PARKED_ORDER))
        holds = KeyHolds()
        for document in documents:
            entry = document.get("entry") or {}
            with contextlib.suppress(InvalidEventError, TypeError):
                holds.hold(
                    (str(entry["aggregate_type"]), str(entry["aggregate_id"])),
                    event_id_of(document["_id"]))
        return holds

    def _parked_document(self, parking: Parking) -> Document:
        # `seq` keeps the parking order, which `outbox parked retry` re-queues a key's events in.
        self._park_seq = max(self._park_seq + 1, time.time_ns())
        document: Document = {
            "collection": parking.ref.collection,
            "document_id": parking.ref.document_id,
            "entry": dict(parking.entry),
            "reason": parking.reason,
            "parked_at": _now(),
            "seq": self._park_seq,
        }
        if len(bson.encode(document)) > MAX_DOCUMENT_BYTES - 1024:
            # An entry that fills a whole document cannot be copied with more fields around it.
            entry = dict(parking.entry)
            payload = entry.pop("payload", b"")
            entry["payload_omitted_bytes"] = len(payload) if isinstance(payload, bytes) else -1
            document["entry"] = entry
        return document

    # -- lease and resume token ----------------------------------------------------------------

    def try_lease(self, owner: str, ttl: float) -> bool:
        now = _now()
        with translated("taking the relay lease"):
            try:
                # Matches when the lease is ours or expired; otherwise the upsert collides with
                # the existing document: another relay is the leader.
                self.state.update_one(
                    {"_id": self.config.lease_id,
                     "$or": [{"owner": owner}, {"expires_at": {"$lte": now}}]},
                    {"$set": {"owner": owner, "expires_at": now + dt.timedelta(seconds=ttl),
                              "renewed_at": now}},
                    upsert=True,
                )
            except DuplicateKeyError:
                return False
        return True

    def release_lease(self, owner: str) -> None:
        with translated("releasing the relay lease"):
            self.state.update_one(
                {"_id": self.config.lease_id, "owner": owner}, {"$set": {"expires_at": _now()}}
            )

    def load_token(self) -> Token | None:
        with translated("reading the resume token"):
            document = self.state.find_one({"_id": self.config.token_id})
        token = document.get("token") if document else None
        return token if isinstance(token, Mapping) else None

    def save_token(self, token: Token) -> None:
        with translated("storing the resume token"):
            self.state.update_one(
                {"_id": self.config.token_id},
                {"$set": {"token": dict(token), "saved_at": _now()}},
                upsert=True,
            )

    def clear_token(self) -> None:
        with translated("clearing the resume token"):
            self.state.delete_one({"_id": self.config.token_id})

    # -- change stream -----------------------------------------------------------------------

    def watch(self, resume_after: Token | None, max_await: float) -> ChangeSource:
        pipeline: Sequence[Mapping[str, Any]] = [{"$match": {
            "ns.coll": {"$in": list(self.config.watched)},
            "operationType": {"$in": ["insert", "update", "replace"]},
            # The relay's own acknowledgements add nothing: filtered out on the server.
            f"updateDescription.updatedFields.{self.config.marker_field}": {"$exists": False},
        }}]
        with translated("opening the change stream", token_given=resume_after is not None):
            stream = self.db.watch(
                pipeline,
                resume_after=resume_after,
                max_await_time_ms=max(1, int(max_await * 1000)),
            )
        return _Stream(stream, resume_after is not None)


    # -- metrics -----------------------------------------------------------------------------

    def backlog(self) -> tuple[int, dt.datetime | None]:
        """Pending events in every relayed collection, and the oldest one's creation time."""
        count, oldest = 0, None
        list_field = self.config.field
        with translated("measuring the backlog"):
            for name in self.config.collections:
                rows = self.db[name].aggregate([
                    {"$match": {f"{list_field}.id": {"$exists": True}}},
                    {"$project": {f"{list_field}.created_at": 1}},
                    {"$unwind": f"${list_field}"},
                    {"$group": {"_id": None, "n": {"$sum": 1},
                                "oldest": {"$min": f"${list_field}.created_at"}}},
                ])
                for row in rows:
                    count += int(row["n"])
                    oldest = _earliest(oldest, row.get("oldest"))
            outbox = self.db[self.config.outbox_collection]
            count += outbox.estimated_document_count()
            first = outbox.find_one({}, {"created_at": 1}, sort=[("_id", ASCENDING)])
            if first is not None:
                oldest = _earliest(oldest, first.get("created_at"))
        return count, oldest


def _earliest(current: dt.datetime | None, other: Any) -> dt.datetime | None:
    if not isinstance(other, dt.datetime):
        return current
    return other if current is None or other < current else current


def mongo_gauges(config: MongoRelayConfig) -> dict[str, Callable[[], float | None]]:
    """Backlog gauges for the metrics endpoint, each read with a short-lived client."""

    def backlog() -> tuple[int, float]:
        with MongoStore(config) as store:
            count, oldest = store.backlog()
        return count, (time.time() - oldest.timestamp()) if oldest else 0.0

    return {
        "backlog_events": lambda: backlog()[0],
        "oldest_pending_age_seconds": lambda: backlog()[1],
    }


def check_source(config: MongoRelayConfig, *, stream: bool) -> None:
    """Start-up check of a MongoDB relay: reachable, a replica set for streams, indexes."""
    with MongoStore(config) as store:
        store.check(stream=stream)

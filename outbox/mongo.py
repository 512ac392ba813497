"""MongoDB write side: events embedded in the aggregate's own document, or an outbox collection."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import bson
from bson import Binary, ObjectId
from bson.errors import InvalidDocument
from pymongo import ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from outbox import sequences
from outbox.errors import (
    AtomicityError,
    ConfigurationError,
    InvalidEventError,
    PayloadTooLargeError,
    UnsupportedTargetError,
)
from outbox.event import Event, Serializer, json_serializer
from outbox.record import OutboxRecord
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES, Outbox

DEFAULT_FIELD = "_outbox"
DEFAULT_COLLECTION = "outbox"
ENTRY_VERSION = 1
# MongoDB refuses documents above 16 MiB (BSON's maxBsonObjectSize).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# The keys of an entry, in the order they are written.
ENTRY_KEYS = (
    "v", "id", "aggregate_type", "aggregate_id", "event_type", "topic", "content_type",
    "headers", "payload", "created_at",
)  # fmt: skip


class OutboxFieldConflictError(InvalidEventError):
    """The update already writes the outbox field; pass the events to `with_events` instead."""


class DocumentTooLargeError(PayloadTooLargeError):
    """With its pending events the document would exceed MongoDB's 16 MiB limit; nothing was
    written."""


def check_field(name: str, setting: str = "field") -> str:
    """A top-level field name: the relay's `$pull` and its index address it by this path."""
    if (
        not isinstance(name, str) or not name or "." in name or name.startswith("$")
        or "\x00" in name
    ):
        raise ConfigurationError(
            f"{setting}={name!r} must be a top-level field name: not empty, no '.', "
            "no leading '$'"
        )
    return name


def check_collection_name(name: str, setting: str = "collection") -> str:
    """MongoDB's rules for a collection name, checked before the server sees it."""
    if (
        not isinstance(name, str) or not name.strip() or "$" in name or "\x00" in name
        or name.startswith("system.") or name != name.strip()
    ):
        raise ConfigurationError(
            f"{setting}={name!r} is not a usable collection name: not empty, no '$', "
            "no 'system.' prefix"
        )
    return name


@dataclass(frozen=True)
class MongoOutbox:
    """How events are stored in MongoDB, and the write helpers.

    Embedded mode (the recommended one): the events of a change are appended to a list field of
    the document the change modifies (`_outbox` by default), in the same single-document write,
    so they are atomic with the business change without a multi-document transaction::

        orders.insert_one(outbox_mongo.new_document({"_id": 42, "state": "PENDING"}, created))
        orders.update_one({"_id": 42},
                          outbox_mongo.with_events({"$set": {"state": "APPROVED"}}, approved))

    The relay (`mongo-poll` or `mongo-stream`) publishes the pending entries of each document
    in list order, then removes exactly those entries with `$pull` by event id, so entries
    appended meanwhile stay. Keep all events of one aggregate in one document: per-aggregate
    order is the order of that document's list. Deleting a document drops its pending events:
    delete it once its list is empty, or record the final events with `publish` instead.

    Outbox-collection mode: `publish(db, *events, session=session)` inserts one document per
    event into the outbox collection inside the caller's multi-document transaction.

    Bad input raises an `outbox.errors` subclass before anything is written. Errors of the write
    itself stay pymongo's: the caller owns the session, and `ClientSession.with_transaction`
    must see pymongo's error labels to retry a transient failure.

    field: the list field of the aggregate documents that holds pending events.
    collection: the outbox collection of `publish` (outbox-collection mode).
    serializer, max_payload_bytes, capture_trace_context: as for `outbox.Outbox`.
    allow_without_transaction: let `publish` write outside a multi-document transaction (the
        events are then not atomic with the caller's other writes).
    sequence: `publish` numbers each event within its aggregate (the `sequence` header, as
        `outbox.Outbox(sequence=True)`) from a counter document per aggregate in
        `<collection>_sequence`, bumped with `$inc` in the caller's transaction: a concurrent
        transaction numbering the same aggregate gets a WriteConflict (transient: the caller's
        `with_transaction` retries it), and an aborted transaction's numbers are given again.
        Needs a transaction (not `allow_without_transaction`). Embedded events
        (`new_document`, `with_events`) are not numbered: they are refused, since the order of
        a document's list already is its aggregate's order.
    """

    field: str = DEFAULT_FIELD
    collection: str = DEFAULT_COLLECTION
    serializer: Serializer = json_serializer
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    capture_trace_context: bool = True
    allow_without_transaction: bool = False
    sequence: bool = False

    def __post_init__(self) -> None:
        check_field(self.field)
        check_collection_name(self.collection)
        if self.sequence and self.allow_without_transaction:
            raise ConfigurationError(
                "sequence=True numbers events in the caller's transaction: it cannot be "
                "combined with allow_without_transaction=True"
            )
        self._recorder  # noqa: B018 - validates max_payload_bytes now, not at the first write

    @cached_property
    def _recorder(self) -> Outbox:
        # The PostgreSQL Outbox holds the validation and serialisation every backend shares.
        return Outbox(
            serializer=self.serializer,
            max_payload_bytes=self.max_payload_bytes,
            capture_trace_context=self.capture_trace_context,
        )

    # -- entries (no I/O) ------------------------------------------------------------------------

    def records(self, events: Sequence[Event]) -> list[OutboxRecord]:
        """Validate and serialise `events`; raises before anything is written."""
        return self._recorder.records(events)

    def entries(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        """The stored form of `events` (see `encode_entry`)."""
        if self.sequence:
            raise ConfigurationError(
                "MongoOutbox(sequence=True) numbers the events of publish() (the outbox "
                "collection) only; embedded events (new_document, with_events) keep their "
                "aggregate's order in the document's list: use a MongoOutbox without sequence"
            )
        return [encode_entry(record) for record in self.records(events)]

    def new_document(self, document: Mapping[str, Any], *events: Event | Any) -> dict[str, Any]:
        """A copy of `document` with `events` as its pending list, for `insert_one` or
        `replace_one`. Raises DocumentTooLargeError if the result exceeds 16 MiB."""
        if not isinstance(document, Mapping):
            raise InvalidEventError(f"document must be a mapping, not {type(document).__name__}")
        existing = document.get(self.field)
        if self.field in document and existing != []:
            raise OutboxFieldConflictError(
                f"the document already has a {self.field!r} field; new_document fills it"
            )
        entries = self.entries(events)
        result = dict(document)
        if entries:
            result[self.field] = entries
        size = _bson_size(result, "the document")
        if size > MAX_DOCUMENT_BYTES:
            raise DocumentTooLargeError(
                f"the document with {len(entries)} event(s) is {size} bytes of BSON; MongoDB's "
                f"limit is {MAX_DOCUMENT_BYTES}"
            )
        return result

    def with_events(
        self,
        update: Mapping[str, Any],
        *events: Event | Any,
        document: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`update` (operators such as `$set`) with `$push: {field: {$each: entries}}` merged in,
        for `update_one`, `update_many` or `find_one_and_update`, with or without a session.

        `document`, when given, is the version of the document the caller holds: the result is
        checked against the 16 MiB limit before writing. Without it the server does that check
        and refuses the whole update (nothing written) if the document would grow too large.
        """
        if isinstance(update, Sequence) and not isinstance(update, str | bytes):
            raise InvalidEventError(
                "aggregation-pipeline updates are not supported: pass an update document "
                "with operators such as $set"
            )
        if not isinstance(update, Mapping):
            raise InvalidEventError(f"update must be a mapping, not {type(update).__name__}")
        merged: dict[str, Any] = {}
        for operator, spec in update.items():
            if not isinstance(operator, str) or not operator.startswith("$"):
                raise InvalidEventError(
                    f"{operator!r} is not an update operator: with_events takes an update "
                    "document ($set, $inc, ...); for a whole new document use new_document() "
                    "with insert_one/replace_one"
                )
            if not isinstance(spec, Mapping):
                raise InvalidEventError(f"the value of {operator} must be a mapping")
            for path, value in spec.items():
                self._check_no_conflict(operator, path, value)
            merged[operator] = dict(spec)
        entries = self.entries(events)
        if not entries:
            return merged
        pushed = {"$each": entries}
        size = _bson_size({"e": entries}, "the events")
        held = _bson_size(document, "document") if document is not None else 0
        if size + held > MAX_DOCUMENT_BYTES:
            raise DocumentTooLargeError(
                f"{len(entries)} event(s) of {size} bytes of BSON"
                + (f" added to a document of {held} bytes" if held else "")
                + f" exceed MongoDB's document limit of {MAX_DOCUMENT_BYTES} bytes"
            )
        merged.setdefault("$push", {})[self.field] = pushed
        return merged

    def _check_no_conflict(self, operator: str, path: Any, value: Any) -> None:
        paths = [path]
        if operator == "$rename" and isinstance(value, str):
            paths.append(value)
        for candidate in paths:
            if not isinstance(candidate, str):
                continue
            if candidate == self.field or candidate.startswith(self.field + "."):
                raise OutboxFieldConflictError(
                    f"the update already writes {candidate!r} with {operator}; the outbox field "
                    f"{self.field!r} is written only by with_events (pass the events to it)"
                )

    # -- outbox-collection mode --------------------------------------------------------------

    def publish(
        self,
        target: Database[Any] | Collection[Any],
        *events: Event | Any,
        session: ClientSession | None = None,
    ) -> list[uuid.UUID]:
        """Insert `events` into the outbox collection in `session`'s transaction; never commits.

        `target` is a Database (the collection named by `collection` is used) or the outbox
        Collection itself. Returns the event ids.
        """
        if isinstance(target, Database):
            collection: Collection[Any] = target[self.collection]
        elif isinstance(target, Collection):
            collection = target
        else:
            raise UnsupportedTargetError(
                f"publish needs a pymongo Database or Collection, not {type(target).__name__}"
            )
        if session is not None and not isinstance(session, ClientSession):
            raise UnsupportedTargetError(
                f"session must be a pymongo ClientSession, not {type(session).__name__}"
            )
        in_transaction = session is not None and session.in_transaction
        if not in_transaction and not self.allow_without_transaction:
            # Outside a transaction each insert commits alone: the events would no longer be
            # atomic with the business writes they describe.
            raise AtomicityError(
                "publish needs a ClientSession inside a transaction (session.start_transaction()"
                " or session.with_transaction(...)); pass MongoOutbox(allow_without_transaction"
                "=True) if you accept losing atomicity, or embed the events with with_events()"
            )
        records = self.records(events)
        if self.sequence and records:
            records = self._numbered(collection, records, session)
        documents = []
        for record in records:
            entry = encode_entry(record)
            documents.append({"_id": entry.pop("id"), **entry})
        if documents:
            try:
                collection.insert_many(documents, ordered=True, session=session)
            except (DuplicateKeyError, BulkWriteError) as exc:
                errors = exc.details.get("writeErrors", []) if exc.details else []
                if isinstance(exc, BulkWriteError) and not (
                    errors and all(e.get("code") == 11000 for e in errors)
                ):
                    raise
                raise InvalidEventError(
                    f"an event with one of the ids {[str(r.id) for r in records]} is already in "
                    f"the outbox collection {collection.name!r}"
                ) from exc
        return [record.id for record in records]


    def _numbered(self, collection: Collection[Any], records: list[OutboxRecord],
                  session: ClientSession | None) -> list[OutboxRecord]:
        batch = sequences.counts(records)
        counters: Collection[Any] = collection.database[f"{collection.name}_sequence"]
        returned = []
        for aggregate_type, aggregate_id in batch:  # sorted: one order for every writer
            counter = counters.find_one_and_update(
                {"_id": {"aggregate_type": aggregate_type, "aggregate_id": aggregate_id}},
                {"$inc": {"last_sequence": batch[aggregate_type, aggregate_id]}},
                upsert=True, return_document=ReturnDocument.AFTER, session=session,
            )
            # upsert with ReturnDocument.AFTER always returns the document.
            assert counter is not None
            returned.append((aggregate_type, aggregate_id, counter["last_sequence"]))
        return sequences.numbered(records, batch, returned)


def encode_entry(record: OutboxRecord) -> dict[str, Any]:
    """The stored form of one event (an "entry"), the same in both modes.

    ``v``: format version 1. ``id``: the event id as a BSON UUID (binary subtype 4): 16 bytes,
    matched exactly by `$pull`, decoded alike whatever the client's uuidRepresentation; in the
    outbox collection it is the document's ``_id`` instead. ``aggregate_type``,
    ``aggregate_id`` (the Kafka key), ``event_type``: strings. ``topic``: explicit topic or
    null (the relay's topic template decides). ``content_type``: e.g. ``application/json``.
    ``headers``: a list of ``[name, value]`` string pairs (a list rather than a sub-document,
    so header names with ``.`` or a leading ``$`` are stored as they are). ``payload``: the
    serialised payload as BSON binary, sent to Kafka unchanged. ``created_at``: BSON date (UTC,
    millisecond precision).
    """
    created = record.created_at or dt.datetime.now(dt.UTC)
    return {
        "v": ENTRY_VERSION,
        "id": Binary.from_uuid(record.id),
        "aggregate_type": record.aggregate_type,
        "aggregate_id": record.aggregate_id,
        "event_type": record.event_type,
        "topic": record.topic,
        "content_type": record.content_type,
        "headers": [[key, value] for key, value in record.headers.items()],
        "payload": record.payload,
        "created_at": created,
    }


def event_id_of(value: Any) -> uuid.UUID:
    """The UUID stored as an entry id: a BSON UUID (or uuid.UUID when the client decodes
    them) or its string form; raises InvalidEventError for anything else."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, Binary) and value.subtype == 4 and len(value) == 16:
        return uuid.UUID(bytes=bytes(value))
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError as exc:
            raise InvalidEventError(f"event id {value!r} is not a UUID") from exc
    raise InvalidEventError(f"event id {value!r} is not a UUID")


def decode_entry(entry: Mapping[str, Any], *, id_key: str = "id") -> OutboxRecord:
    """Inverse of `encode_entry` (`id_key="_id"` for outbox-collection documents); raises
    InvalidEventError, naming what is wrong, for an entry the relay cannot publish."""
    if not isinstance(entry, Mapping):
        raise InvalidEventError(f"outbox entry is a {type(entry).__name__}, not a document")
    version = entry.get("v", ENTRY_VERSION)
    if version != ENTRY_VERSION:
        raise InvalidEventError(f"outbox entry format version {version!r} is not supported")
    strings = {}
    for key in ("aggregate_type", "aggregate_id", "event_type"):
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidEventError(f"outbox entry field {key!r} is {value!r}, not a string")
        strings[key] = value
    content_type = entry.get("content_type")
    if not isinstance(content_type, str) or not content_type:
        raise InvalidEventError(f"outbox entry content_type is {content_type!r}")
    topic = entry.get("topic")
    if topic is not None and (not isinstance(topic, str) or not topic):
        raise InvalidEventError(f"outbox entry topic is {topic!r}")
    payload = entry.get("payload")
    if isinstance(payload, Binary | bytearray | memoryview):
        payload = bytes(payload)
    if not isinstance(payload, bytes):
        raise InvalidEventError(f"outbox entry payload is a {type(payload).__name__}, not bytes")
    created = entry.get("created_at")
    if created is not None and not isinstance(created, dt.datetime):
        raise InvalidEventError(f"outbox entry created_at is {created!r}")
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)  # BSON dates are UTC
    return OutboxRecord(
        id=event_id_of(entry.get(id_key)),
        payload=payload,
        content_type=content_type,
        headers=_decode_headers(entry.get("headers")),
        topic=topic,
        created_at=created,
        **strings,
    )


def _decode_headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    # A sub-document is accepted too, for entries written by hand or by other tools.
    pairs = value.items() if isinstance(value, Mapping) else value
    headers: dict[str, str] = {}
    try:
        for key, item in pairs:
            if not isinstance(key, str) or not isinstance(item, str):
                raise InvalidEventError(f"outbox entry header {key!r} is not a string pair")
            headers[key] = item
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(f"outbox entry headers are malformed: {value!r}") from exc
    return headers


def aggregate_id(document_or_id: Any) -> str:
    """The aggregate id (Kafka key) of a document: its `_id` as a string. Accepts the document
    or the id (ObjectId, UUID, string or integer)."""
    value = document_or_id
    if isinstance(document_or_id, Mapping):
        if "_id" not in document_or_id:
            raise InvalidEventError(
                "the document has no _id yet: set one (e.g. ObjectId()) before making its events"
            )
        value = document_or_id["_id"]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, ObjectId | uuid.UUID) or (
        isinstance(value, int) and not isinstance(value, bool)
    ):
        return str(value)
    if isinstance(value, Binary) and value.subtype == 4:
        return str(value.as_uuid())
    raise InvalidEventError(
        f"cannot make an aggregate id from {value!r}: pass aggregate_id explicitly"
    )


def event_for(
    document_or_id: Any, aggregate_type: str, event_type: str, payload: Any = None, **options: Any
) -> Event:
    """An Event whose aggregate id is the document's `_id` (see `aggregate_id`); `options` are
    the other Event fields (headers, topic, content_type, id, created_at)."""
    return Event(
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id(document_or_id),
        event_type=event_type,
        payload=payload,
        **options,
    )


def _bson_size(document: Mapping[str, Any], what: str) -> int:
    try:
        return len(bson.encode(document))
    except (InvalidDocument, TypeError, OverflowError) as exc:
        raise InvalidEventError(f"{what} cannot be encoded as BSON: {exc}") from exc


default_outbox = MongoOutbox()


def _configured(field: str) -> MongoOutbox:
    if field == default_outbox.field:
        return default_outbox
    return dataclasses.replace(default_outbox, field=field)


def new_document(
    document: Mapping[str, Any], *events: Event | Any, field: str = DEFAULT_FIELD
) -> dict[str, Any]:
    """`document` with `events` pending in `field`: see `MongoOutbox.new_document`."""
    return _configured(field).new_document(document, *events)


def with_events(
    update: Mapping[str, Any],
    *events: Event | Any,
    field: str = DEFAULT_FIELD,
    document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`update` plus `$push` of `events` to `field`: see `MongoOutbox.with_events`."""
    return _configured(field).with_events(update, *events, document=document)


def publish(
    target: Database[Any] | Collection[Any],
    *events: Event | Any,
    session: ClientSession | None = None,
    allow_without_transaction: bool = False,
) -> list[uuid.UUID]:
    """Insert `events` into the outbox collection in `session`'s transaction: see
    `MongoOutbox.publish`."""
    outbox = default_outbox
    if allow_without_transaction:
        outbox = dataclasses.replace(outbox, allow_without_transaction=True)
    return outbox.publish(target, *events, session=session)


__all__ = [
    "DEFAULT_COLLECTION",
    "DEFAULT_FIELD",
    "MAX_DOCUMENT_BYTES",
    "DocumentTooLargeError",
    "MongoOutbox",
    "OutboxFieldConflictError",
    "aggregate_id",
    "decode_entry",
    "default_outbox",
    "encode_entry",
    "event_for",
    "event_id_of",
    "new_document",
    "publish",
    "with_events",
]

"""Events a MongoDB relay could never publish: list them, and re-queue them key by key.

The relays park an event by copying it, with the reason, into the parked collection and pulling
it from its document (relay/mongo/store.py). Re-queueing puts a key's parked events back where
the relays read pending events, in the order they were parked and *before* the key's newer
pending events: at the front of their document's list, or, when that document is gone (the
aggregate was deleted) or the event came from the outbox collection, into the outbox
collection under its own id. The first of them is the one the key is held behind
(relay/core/holds.py), so the key's order survives.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import MongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError

from outbox.errors import InvalidEventError
from outbox.mongo import event_id_of
from relay.mongo.config import MongoRelayConfig
from relay.mongo.store import PARKED_ORDER, translated

Document = dict[str, Any]


@dataclass(frozen=True)
class ParkedEntry:
    event_id: Any
    collection: str
    document_id: Any
    aggregate_type: str | None
    aggregate_id: str | None
    event_type: str | None
    reason: str
    parked_at: dt.datetime | None
    complete: bool  # False: the payload was too large to keep beside the reason (not re-queueable)

    @property
    def uuid(self) -> uuid.UUID | None:
        try:
            return event_id_of(self.event_id)
        except InvalidEventError:
            return None

    @property
    def key(self) -> tuple[str, str] | None:
        if self.aggregate_type is None or self.aggregate_id is None:
            return None
        return (self.aggregate_type, self.aggregate_id)


def _entry(document: Mapping[str, Any]) -> ParkedEntry:
    entry = document.get("entry") or {}
    return ParkedEntry(
        event_id=document["_id"],
        collection=str(document.get("collection")),
        document_id=document.get("document_id"),
        aggregate_type=entry.get("aggregate_type"),
        aggregate_id=entry.get("aggregate_id"),
        event_type=entry.get("event_type"),
        reason=str(document.get("reason", "")),
        parked_at=document.get("parked_at"),
        complete="payload_omitted_bytes" not in entry and "aggregate_type" in entry,
    )


class ParkedEvents:
    """The parked collection of one relay configuration."""

    def __init__(self, config: MongoRelayConfig) -> None:
        self.config = config
        self.client: MongoClient[Document] = MongoClient(
            config.url, appname="outbox-cli", tz_aware=True,
            serverSelectionTimeoutMS=int(config.server_timeout * 1000))
        self.db = self.client[config.database]
        self.parked = self.db[config.parked_collection]

    def __enter__(self) -> ParkedEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def entries(self, limit: int = 100) -> list[ParkedEntry]:
        """Grouped by key, each key's events in the order they were parked."""
        with translated("reading parked events"):
            documents = list(self.parked.find({}, sort=PARKED_ORDER))
        entries = [_entry(document) for document in documents]
        first: dict[tuple[str, str] | None, int] = {}
        for index, entry in enumerate(entries):
            first.setdefault(entry.key, index)
        # Stable: within a key, parking order stays.
        entries.sort(key=lambda e: (e.key is None, first[e.key]))
        return entries[:limit]

    def retry(self, event_ids: list[uuid.UUID] | None = None) -> list[Any]:
        """Re-queue every parked event of the keys of `event_ids` (all keys when None), in
        parking order; returns the ids re-queued. Events kept without their payload stay."""
        with translated("reading parked events"):
            documents = list(self.parked.find({}, sort=PARKED_ORDER))
        entries = [(_entry(document), document) for document in documents]
        wanted = {e.key for e, _ in entries if e.key is not None
                  and (event_ids is None or e.uuid in event_ids)}
        moved: list[Any] = []
        for key in wanted:
            group = [(e, d) for e, d in entries if e.key == key and e.complete]
            self._requeue(group)
            if not group:
                continue
            # Only the parked documents read above: a running relay may already have parked a
            # re-queued event again (a new document under the same _id, with a new seq), and
            # that one must stay.
            with translated("removing re-queued events from the parked collection"):
                self.parked.delete_many({"$or": [{"_id": e.event_id, "seq": d.get("seq")}
                                                 for e, d in group]})
            moved += [e.event_id for e, _ in group]
        return moved

    def _requeue(self, group: list[tuple[ParkedEntry, Document]]) -> None:
        """Back in front of the key's pending events; a crash half-way re-queues twice at most
        (the parked documents go only after), never loses one."""
        config = self.config
        standalone: list[Document] = []
        by_document: dict[tuple[str, Any], list[Document]] = {}
        for entry, document in group:
            if entry.collection == config.outbox_collection:
                standalone.append(dict(document["entry"]))
            else:
                by_document.setdefault((entry.collection, entry.document_id), []).append(
                    dict(document["entry"]))
        for (collection, document_id), items in by_document.items():
            with translated(f"re-queueing parked events into {collection}"):
                result = self.db[collection].update_one(
                    {"_id": document_id},
                    {"$push": {config.field: {"$each": items, "$position": 0}}})
            if result.matched_count == 0:
                # The aggregate is gone: its events go to the outbox collection, each its own
                # document with the event id as _id (the shape outbox.mongo writes there).
                standalone += [{"_id": item["id"], **{k: v for k, v in item.items() if k != "id"}}
                               for item in items]
        if standalone:
            with translated("re-queueing parked events into the outbox collection"):
                try:
                    # Unordered only to go on past duplicates; the server still inserts them
                    # in list order.
                    self.db[config.outbox_collection].insert_many(standalone, ordered=False)
                except (DuplicateKeyError, BulkWriteError) as exc:
                    # Already re-queued by an earlier, interrupted retry: at least once.
                    errors = exc.details.get("writeErrors", []) if exc.details else []
                    if not all(error.get("code") == 11000 for error in errors):
                        raise

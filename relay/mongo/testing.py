"""In-memory fakes of the MongoDB relays' boundaries (store, change stream) for tests; the sink's
is relay/core/testing.py."""

from __future__ import annotations

import copy
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

from outbox.mongo import event_id_of
from relay.core.holds import KeyHolds
from relay.mongo.config import MongoRelayConfig
from relay.mongo.errors import ResumeTokenInvalidError
from relay.mongo.paging import BRACKETS, bracket_of
from relay.mongo.tracker import AckPlan

Document = dict[str, Any]
Token = Mapping[str, Any]


def _sort_key(value: Any) -> tuple[int, Any]:
    return (bracket_of(value) or 0, value)


class InMemoryStore:
    """OutboxStore over dictionaries, with an oplog-like change log for streams.

    The application side writes through `insert`, `push`, `replace` and `delete`, which record
    change events shaped like MongoDB's (a push onto a non-empty list is reported as positional
    `field.N` updates). `apply` records the relay's pulls as MongoDB would, marker included.
    """

    def __init__(self, config: MongoRelayConfig) -> None:
        self.config = config
        self.collections: dict[str, dict[Any, Document]] = {}
        self.parked: dict[Any, Document] = {}
        self.changes: list[Document] = []
        self.history_starts = 1  # tokens before this one are "no longer in the oplog"
        self.token: Token | None = None
        self.saved_tokens: list[Token] = []
        self.lease_owner: str | None = None
        self.lease_expires = 0.0
        self.plans: list[AckPlan] = []
        self.pages: list[tuple[str, dict[str, Any]]] = []
        self.fail_apply: Exception | None = None
        self.closed = False

    # -- the application's writes ---------------------------------------------------------------

    def _log(self, collection: str, operation: str, document_id: Any, **more: Any) -> None:
        token = {"_data": f"{len(self.changes) + 1:010d}"}
        self.changes.append({
            "_id": token, "operationType": operation, "ns": {"db": "test", "coll": collection},
            "documentKey": {"_id": document_id}, **copy.deepcopy(more)})

    def insert(self, collection: str, document: Mapping[str, Any]) -> None:
        stored = copy.deepcopy(dict(document))
        self.collections.setdefault(collection, {})[stored["_id"]] = stored
        self._log(collection, "insert", stored["_id"], fullDocument=stored)

    def replace(self, collection: str, document: Mapping[str, Any]) -> None:
        stored = copy.deepcopy(dict(document))
        self.collections.setdefault(collection, {})[stored["_id"]] = stored
        self._log(collection, "replace", stored["_id"], fullDocument=stored)

    def push(self, collection: str, document_id: Any, *entries: Mapping[str, Any]) -> None:
        documents = self.collections.setdefault(collection, {})
        document = documents.setdefault(document_id, {"_id": document_id})
        items = document.setdefault(self.config.field, [])
        start = len(items)
        items.extend(copy.deepcopy(dict(e)) for e in entries)
        updated: dict[str, Any]
        if start:
            updated = {f"{self.config.field}.{start + i}": e for i, e in enumerate(entries)}
        else:
            updated = {self.config.field: list(items)}
        self._log(collection, "update", document_id, updateDescription={
            "updatedFields": updated, "removedFields": [], "truncatedArrays": []})

    def delete(self, collection: str, document_id: Any) -> None:
        del self.collections[collection][document_id]
        self._log(collection, "delete", document_id)

    def pending(self, collection: str | None = None) -> list[Any]:
        """Ids of the entries still pending, over all relayed collections by default."""
        names = [collection] if collection else list(self.config.collections)
        ids = [
            entry.get("id")
            for name in names for document in self.collections.get(name, {}).values()
            for entry in document.get(self.config.field, [])
        ]
        if collection is None:
            ids += list(self.collections.get(self.config.outbox_collection, {}))
        return ids

    # -- OutboxStore -----------------------------------------------------------------------------

    def page(
        self, collection: str, id_filter: Mapping[str, Any], limit: int, *, embedded: bool
    ) -> list[Mapping[str, Any]]:
        self.pages.append((collection, dict(id_filter)))
        condition = id_filter.get("_id", {})
        documents = sorted(
            self.collections.get(collection, {}).values(), key=lambda d: _sort_key(d["_id"]))
        result: list[Mapping[str, Any]] = []
        for document in documents:
            document_id = document["_id"]
            if "$gt" in condition:
                after = condition["$gt"]
                if bracket_of(document_id) != bracket_of(after) or not document_id > after:
                    continue
            if "$type" in condition:
                bracket = bracket_of(document_id)
                if bracket is None or not set(BRACKETS[bracket]) & set(condition["$type"]):
                    continue
            if embedded and not any(
                isinstance(e, Mapping) and "id" in e
                for e in document.get(self.config.field) or []
            ):
                continue
            result.append(copy.deepcopy(document))
            if len(result) == limit:
                break
        return result

    def apply(self, plan: AckPlan) -> None:
        if self.fail_apply is not None:
            raise self.fail_apply
        self.plans.append(plan)
        for parking in plan.parks:
            self.parked[parking.ref.event_id] = {
                "collection": parking.ref.collection, "document_id": parking.ref.document_id,
                "entry": dict(parking.entry), "reason": parking.reason}
        for (collection, _), (document_id, event_ids) in plan.pulls.items():
            document = self.collections.get(collection, {}).get(document_id)
            if document is None:
                continue
            items = document.get(self.config.field, [])
            document[self.config.field] = [
                e for e in items if not (isinstance(e, Mapping) and e.get("id") in event_ids)]
            document[self.config.marker_field] = dt.datetime.now(dt.UTC)
            self._log(collection, "update", document_id, updateDescription={
                "updatedFields": {self.config.field: document[self.config.field],
                                  self.config.marker_field: document[self.config.marker_field]},
                "removedFields": [], "truncatedArrays": []})
        for collection, ids in plan.deletes.items():
            for document_id in ids:
                self.collections.get(collection, {}).pop(document_id, None)

    def held_keys(self) -> KeyHolds:
        holds = KeyHolds()
        for event_id, parked in self.parked.items():
            entry = parked["entry"]
            if "aggregate_type" in entry:
                holds.hold((entry["aggregate_type"], entry["aggregate_id"]),
                           event_id_of(event_id))
        return holds

    def try_lease(self, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        if self.lease_owner in (None, owner) or self.lease_expires <= now:
            self.lease_owner, self.lease_expires = owner, now + ttl
            return True
        return False

    def release_lease(self, owner: str) -> None:
        if self.lease_owner == owner:
            self.lease_expires = 0.0

    def load_token(self) -> Token | None:
        return self.token

    def save_token(self, token: Token) -> None:
        self.token = dict(token)
        self.saved_tokens.append(dict(token))

    def clear_token(self) -> None:
        self.token = None

    def watch(self, resume_after: Token | None, max_await: float) -> InMemoryStream:
        if resume_after is None:
            return InMemoryStream(self, len(self.changes))
        data = str(resume_after.get("_data", ""))
        if not data.isdigit():
            raise ResumeTokenInvalidError(f"resume token {resume_after!r} is not recognised")
        position = int(data)
        if position + 1 < self.history_starts or position > len(self.changes):
            raise ResumeTokenInvalidError(f"resume token {resume_after!r}: history lost")
        return InMemoryStream(self, position)

    def close(self) -> None:
        self.closed = True


class InMemoryStream:
    """A change stream over InMemoryStore.changes, filtered as the relay's pipeline filters."""

    def __init__(self, store: InMemoryStore, position: int) -> None:
        self.store = store
        self.position = position  # changes[:position] are behind the stream
        self._token: Token = {"_data": f"{position:010d}"}
        self.alive = True

    def try_next(self) -> Mapping[str, Any] | None:
        config = self.store.config
        while self.position < len(self.store.changes):
            change = self.store.changes[self.position]
            self.position += 1
            self._token = change["_id"]
            updated = change.get("updateDescription", {}).get("updatedFields", {})
            if (
                change["ns"]["coll"] in config.watched
                and change["operationType"] in ("insert", "update", "replace")
                and config.marker_field not in updated
            ):
                return copy.deepcopy(change)
        return None

    @property
    def resume_token(self) -> Token | None:
        return self._token

    def close(self) -> None:
        self.alive = False

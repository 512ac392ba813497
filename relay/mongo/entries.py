"""Reading pending events out of documents and change events, without I/O."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import Binary

from outbox.errors import InvalidEventError
from outbox.mongo import decode_entry
from relay.mongo.tracker import EntryRef, Pending


@dataclass
class Found:
    """Pending events in list order, and how many entries had no id to remove them by."""

    pending: list[Pending] = field(default_factory=list)
    unidentifiable: int = 0


def _identifiable(value: Any) -> bool:
    return isinstance(value, Binary | str | uuid.UUID)


def _pending(ref: EntryRef, entry: Mapping[str, Any], id_key: str) -> Pending:
    try:
        return Pending(ref, entry, record=decode_entry(entry, id_key=id_key))
    except InvalidEventError as exc:
        return Pending(ref, entry, problem=f"malformed outbox entry: {exc}")


def in_entries(collection: str, document_id: Any, entries: Any) -> Found:
    """The pending events of one document's list, in list order."""
    found = Found()
    if not isinstance(entries, list):
        found.unidentifiable += entries is not None
        return found
    for entry in entries:
        event_id = entry.get("id") if isinstance(entry, Mapping) else None
        if not _identifiable(event_id):
            # Nothing to $pull it by: it cannot come from outbox.mongo, and is left alone.
            found.unidentifiable += 1
            continue
        ref = EntryRef.of(collection, document_id, event_id, embedded=True)
        found.pending.append(_pending(ref, entry, "id"))
    return found


def in_document(collection: str, document: Mapping[str, Any], list_field: str) -> Found:
    """The pending events embedded in an aggregate document."""
    return in_entries(collection, document["_id"], document.get(list_field))


def in_outbox_document(collection: str, document: Mapping[str, Any]) -> Found:
    """The one event an outbox-collection document holds (its _id is the event id)."""
    ref = EntryRef.of(collection, document["_id"], document["_id"], embedded=False)
    return Found([_pending(ref, document, "_id")])


def appended_entries(updated_fields: Mapping[str, Any], list_field: str) -> list[Any]:
    """The list entries an update wrote, in list order.

    MongoDB describes a `$push` onto an existing array as one updated field per new position
    (`_outbox.3`, `_outbox.4`), and a write of the whole array (the first push, a `$set`, or a
    server that prefers it) as the field itself.
    """
    if list_field in updated_fields:
        value = updated_fields[list_field]
        return list(value) if isinstance(value, list) else []
    prefix = list_field + "."
    positional = []
    for key, value in updated_fields.items():
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            positional.append((int(key[len(prefix):]), value))
    # Numeric order: "_outbox.10" comes after "_outbox.9".
    return [value for _, value in sorted(positional, key=lambda item: item[0])]


def in_change(
    change: Mapping[str, Any],
    *,
    list_field: str,
    marker_field: str,
    outbox_collection: str,
) -> Found:
    """The events a change event brings, in the order they were written.

    Inserts and replaces carry the whole document. For updates the change's own
    updateDescription is used rather than `fullDocument: updateLookup`: it holds exactly the
    entries this write appended, costs no extra read per change, and survives the document
    being deleted before the relay gets to it (a lookup returns the document as it is *now*).
    The relay's own `$pull`s are recognised by the marker field they set and skipped: the
    entries they show were already read from the change that added them.
    """
    collection = change["ns"]["coll"]
    operation = change["operationType"]
    document_id = change["documentKey"]["_id"]
    if collection == outbox_collection:
        document = change.get("fullDocument")
        if operation == "insert" and isinstance(document, Mapping):
            return in_outbox_document(collection, document)
        return Found()
    if operation in ("insert", "replace"):
        document = change.get("fullDocument") or {}
        return in_entries(collection, document_id, document.get(list_field))
    if operation == "update":
        updated = change.get("updateDescription", {}).get("updatedFields", {})
        if marker_field in updated:
            return Found()
        return in_entries(collection, document_id, appended_entries(updated, list_field))
    return Found()

"""The MongoDB relays' decisions, free of I/O: what is in flight, what to pull, which token."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions

from outbox.record import OutboxRecord
from relay.core.watermark import Group, Watermark

# Keys are the BSON of the stored values, so any _id (sub-documents included) is hashable and
# compares the way the server compares it.
_CODEC: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@dataclass(frozen=True, eq=False, slots=True)
class EntryRef:
    """Where one pending event is stored: enough to remove it once Kafka acknowledged it.

    `document_id` and `event_id` are the stored values, used as they are in the `$pull` (or the
    delete of an outbox-collection document), so the server matches exactly the entry read.
    """

    collection: str
    document_id: Any
    event_id: Any
    embedded: bool
    document_key: bytes
    key: bytes

    @classmethod
    def of(cls, collection: str, document_id: Any, event_id: Any, *, embedded: bool) -> EntryRef:
        document_key = bson.encode({"c": collection, "d": document_id}, codec_options=_CODEC)
        key = document_key + bson.encode({"e": event_id}, codec_options=_CODEC)
        return cls(collection, document_id, event_id, embedded, document_key, key)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntryRef) and other.key == self.key

    def __repr__(self) -> str:
        return f"EntryRef({self.collection}, {self.document_id!r}, {self.event_id!r})"


@dataclass(frozen=True, slots=True)
class Pending:
    """One pending event as read: its record, or the reason it can never be published."""

    ref: EntryRef
    entry: Mapping[str, Any]
    record: OutboxRecord | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Parking:
    ref: EntryRef
    entry: Mapping[str, Any]
    reason: str


@dataclass
class AckPlan:
    """Source writes that Kafka's answers allow: park these entries, then remove these."""

    # (collection, document key) -> (document _id, ids of its entries to $pull), in send order
    pulls: dict[tuple[str, bytes], tuple[Any, list[Any]]] = field(default_factory=dict)
    # outbox collection -> _ids of its documents to delete
    deletes: dict[str, list[Any]] = field(default_factory=dict)
    parks: list[Parking] = field(default_factory=list)
    refs: list[EntryRef] = field(default_factory=list)

    def add(self, ref: EntryRef) -> None:
        self.refs.append(ref)
        if ref.embedded:
            slot = (ref.collection, ref.document_key)
            if slot not in self.pulls:
                self.pulls[slot] = (ref.document_id, [])
            self.pulls[slot][1].append(ref.event_id)
        else:
            self.deletes.setdefault(ref.collection, []).append(ref.document_id)

    def __bool__(self) -> bool:
        return bool(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


class Acknowledgements:
    """Events handed to Kafka, until their removal from the source has been applied.

    An event is *known* from `sent` until `applied`: while known it is never sent again, even
    when a later read still shows it (the pull has not happened yet). Only the entries whose
    delivery succeeded (or that were parked) go into a plan, so an entry appended to the same
    document meanwhile is never removed.
    """

    def __init__(self) -> None:
        self._known: dict[EntryRef, Pending] = {}
        self._delivered: list[EntryRef] = []
        self._parked: list[Parking] = []

    def __len__(self) -> int:
        return len(self._known)

    def is_known(self, ref: EntryRef) -> bool:
        return ref in self._known

    def sent(self, pending: Pending) -> None:
        self._known[pending.ref] = pending

    def delivered(self, pending: Pending) -> None:
        if pending.ref in self._known:
            self._delivered.append(pending.ref)

    def parked(self, pending: Pending, reason: str) -> None:
        if pending.ref in self._known:
            self._parked.append(Parking(pending.ref, pending.entry, reason))

    @property
    def ready(self) -> int:
        """Answers waiting to be applied to the source."""
        return len(self._delivered) + len(self._parked)

    def plan(self) -> AckPlan:
        """What may be written to the source now; call `applied` once it has been."""
        plan = AckPlan()
        for parking in self._parked:
            plan.parks.append(parking)
            plan.add(parking.ref)
        for ref in self._delivered:
            plan.add(ref)
        self._parked = []
        self._delivered = []
        return plan

    def applied(self, plan: AckPlan) -> None:
        for ref in plan.refs:
            self._known.pop(ref, None)


class TokenLog:
    """Resume tokens of the changes read, oldest first, each with the events it still waits for.

    The rule (relay/core/watermark.py, a change being a group): the token of a change may be
    stored once every event sent for that change and for all changes before it has been
    delivered by Kafka *and* removed from its document (or parked). Resuming there replays
    nothing that is still needed; an event already removed may be replayed and sent again (at
    least once), never skipped.
    """

    def __init__(self) -> None:
        self._changes: Watermark[Mapping[str, Any]] = Watermark()
        self._owner: dict[EntryRef, Group[Mapping[str, Any]]] = {}

    def change(self, token: Mapping[str, Any], refs: Iterable[EntryRef]) -> None:
        """A change was read and these events were sent for it (none: done at once)."""
        for ref in refs:
            if ref not in self._owner:
                self._owner[ref] = self._changes.sent()
        self._changes.close(token)

    def acknowledged(self, refs: Iterable[EntryRef]) -> None:
        """These events' removal from the source has been applied."""
        for ref in refs:
            owner = self._owner.pop(ref, None)
            if owner is not None:
                self._changes.done(owner)

    def committable(self) -> Mapping[str, Any] | None:
        """The newest token that may be stored now, or None if none became storable."""
        token = None
        for change in self._changes.pop_done():
            token = change.position
        return token

    @property
    def empty(self) -> bool:
        """No change read so far waits for any event."""
        return self._changes.waiting == 0

    @property
    def waiting(self) -> int:
        return len(self._owner)

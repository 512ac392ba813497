"""Domain events recorded on SQLAlchemy entities, written to the outbox when the session flushes.

    class Order(Base, RecordsEvents):
        ...
    order.record_event("OrderApproved", {"orderId": order.id})

    outbox.aggregates.install(SessionFactory)   # once, at start-up

Events recorded on any entity of a session are written at the next flush (or at commit if
nothing else changed), in the order they were recorded, in the session's transaction; also for
an entity the same unit of work deletes. An event belongs to the transaction (or savepoint)
active when it was recorded: `begin_nested()` flushes what was recorded before it into the outer
transaction, and a rollback discards what was recorded inside what it rolls back, written or not.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import event as sa_event
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import flag_dirty

from outbox import extras
from outbox.errors import InvalidEventError
from outbox.event import Event
from outbox.writer import Outbox, default_outbox

_order = itertools.count()
_PENDING = "_outbox_pending_events"
_INSTALLED = "_outbox_installed"
# session.info key: entities deleted in this session's transaction that may still hold events
# (a deleted entity leaves the identity map at flush, before the events are taken).
_DELETED = "_outbox_deleted_entities"


@dataclass(frozen=True)
class _Recorded:
    order: int
    event_type: str
    payload: Any
    headers: Mapping[str, str]
    topic: str | None
    content_type: str | None


class RecordsEvents:
    """Mixin for mapped classes. `__aggregate_type__` defaults to the class name and the
    aggregate id to the primary key (known once the row is flushed)."""

    __aggregate_type__: ClassVar[str | None] = None

    def record_event(
        self,
        event_type: str,
        payload: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        topic: str | None = None,
        content_type: str | None = None,
    ) -> None:
        if not isinstance(event_type, str) or not event_type.strip():
            raise InvalidEventError(f"event_type must be a non-empty string, got {event_type!r}")
        pending: list[_Recorded] = self.__dict__.setdefault(_PENDING, [])
        pending.append(
            _Recorded(next(_order), event_type, payload, dict(headers or {}), topic, content_type)
        )
        # Through every flush, though no column changed: the flush begin_nested() runs before
        # its SAVEPOINT then writes these events into the outer transaction. Emits no SQL.
        if inspect(self, raiseerr=False) is not None:
            flag_dirty(self)

    @property
    def pending_events(self) -> int:
        return len(self.__dict__.get(_PENDING, ()))

    def outbox_aggregate_type(self) -> str:
        return self.__aggregate_type__ or type(self).__name__

    def outbox_aggregate_id(self) -> str:
        identity = inspect(self).identity
        if identity is None:
            raise InvalidEventError(
                f"{type(self).__name__} has no primary key yet; events are built at flush"
            )
        return ":".join(str(part) for part in identity)


def _entities(session: Session) -> dict[int, Any]:
    """Every entity of the session that may hold recorded events."""
    deleted = session.info.get(_DELETED, {}).values()
    return {id(obj): obj for obj in itertools.chain(
        session.identity_map.values(), session.new, session.deleted, deleted)}


def _take_events(session: Session) -> list[Event]:
    entities = _entities(session)
    recorded: list[tuple[_Recorded, RecordsEvents]] = []
    for entity in entities.values():
        if isinstance(entity, RecordsEvents) and entity.__dict__.get(_PENDING):
            recorded += [(item, entity) for item in entity.__dict__[_PENDING]]
    recorded.sort(key=lambda pair: pair[0].order)
    events = [
        Event(
            aggregate_type=entity.outbox_aggregate_type(),
            aggregate_id=entity.outbox_aggregate_id(),
            event_type=item.event_type,
            payload=item.payload,
            headers=item.headers,
            topic=item.topic,
            content_type=item.content_type,
        )
        for item, entity in recorded
    ]
    for _, entity in recorded:
        entity.__dict__.pop(_PENDING, None)
    return events


def _writers(outbox: Outbox) -> tuple[Any, Any]:
    def after_flush(session: Session, *_: Any) -> None:
        # post-exec: new rows have their primary keys, so aggregate ids are known.
        events = _take_events(session)
        if events:
            outbox.publish(session, *events)

    def before_commit(session: Session) -> None:
        # An entity that only recorded an event is not dirty, so no flush would write it.
        session.flush()
        after_flush(session)

    return after_flush, before_commit


def _discard_pending(session: Session, *_: Any) -> None:
    # A rollback (of the transaction or of a savepoint): the change they describe did not happen.
    for entity in _entities(session).values():
        if isinstance(entity, RecordsEvents):
            entity.__dict__.pop(_PENDING, None)


def _discard_own(_session: Session, entity: Any) -> None:
    # A new entity leaving the session because its transaction rolled back.
    if isinstance(entity, RecordsEvents):
        entity.__dict__.pop(_PENDING, None)


def _remember_deleted(session: Session, entity: Any) -> None:
    if isinstance(entity, RecordsEvents) and entity.__dict__.get(_PENDING):
        session.info.setdefault(_DELETED, {})[id(entity)] = entity


def _forget_deleted(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction ended
        session.info.pop(_DELETED, None)


def install(
    target: type[Session] | sessionmaker[Any] | Any, outbox: Outbox = default_outbox
) -> None:
    """Write recorded events at flush (and at commit) for sessions made by `target`, and only
    those: other sessions of the process are left alone.

    `target` is a Session subclass, a `sessionmaker` (its own Session subclass is hooked), or an
    `async_sessionmaker` (it is given its own subclass of its sync session class, where flushes
    happen). Installing twice is harmless.
    """
    if extras.is_sqlalchemy_asyncio(target):
        if not hasattr(target, "configure"):
            raise TypeError("install() takes an async_sessionmaker, not an AsyncSession class")
        factory: Any = target
        hook_target = factory.kw.get("sync_session_class", Session)
        if not getattr(hook_target, _INSTALLED, False):
            hook_target = type("OutboxSession", (hook_target,), {})
            factory.configure(sync_session_class=hook_target)
    elif isinstance(target, sessionmaker):
        hook_target = target.class_
    else:
        hook_target = target
    if getattr(hook_target, _INSTALLED, False):
        return
    after_flush, before_commit = _writers(outbox)
    sa_event.listen(hook_target, "after_flush_postexec", after_flush)
    sa_event.listen(hook_target, "before_commit", before_commit)
    sa_event.listen(hook_target, "persistent_to_deleted", _remember_deleted)
    sa_event.listen(hook_target, "after_soft_rollback", _discard_pending)
    sa_event.listen(hook_target, "pending_to_transient", _discard_own)
    sa_event.listen(hook_target, "after_transaction_end", _forget_deleted)
    with contextlib.suppress(AttributeError, TypeError):
        setattr(hook_target, _INSTALLED, True)

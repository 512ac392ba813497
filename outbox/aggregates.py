"""Domain events recorded on SQLAlchemy entities, written to the outbox when the session flushes.

    class Order(Base, RecordsEvents):
        ...
    order.record_event("OrderApproved", {"orderId": order.id})

    outbox.aggregates.install(SessionFactory)   # once, at start-up

Events recorded on any entity of a session are written at the next flush (or at commit if
nothing else changed), in the order they were recorded, in the session's transaction.
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

from outbox.errors import InvalidEventError
from outbox.event import Event
from outbox.writer import Outbox, default_outbox

_order = itertools.count()
_PENDING = "_outbox_pending_events"
_INSTALLED = "_outbox_installed"


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


def _take_events(session: Session) -> list[Event]:
    entities = {id(obj): obj for obj in itertools.chain(session.identity_map.values(), session.new)}
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
    # The change they describe did not happen.
    for entity in list(session.identity_map.values()):
        if isinstance(entity, RecordsEvents):
            entity.__dict__.pop(_PENDING, None)


def install(
    target: type[Session] | sessionmaker[Any] | Any, outbox: Outbox = default_outbox
) -> None:
    """Write recorded events at flush (and at commit) for sessions made by `target`.

    `target` is a Session subclass, a `sessionmaker`, or an `async_sessionmaker` (its sync
    session class is hooked, which is where flushes happen). Installing twice is harmless.
    """
    hook_target = getattr(target, "sync_session_class", None) or target
    if hasattr(target, "class_") and getattr(target.class_, "sync_session_class", None):
        hook_target = target.class_.sync_session_class
    if getattr(hook_target, _INSTALLED, False):
        return
    after_flush, before_commit = _writers(outbox)
    sa_event.listen(hook_target, "after_flush_postexec", after_flush)
    sa_event.listen(hook_target, "before_commit", before_commit)
    sa_event.listen(hook_target, "after_rollback", _discard_pending)
    with contextlib.suppress(AttributeError, TypeError):
        setattr(hook_target, _INSTALLED, True)

"""Per-key order across parking: once an event of a key is parked, the key's later events wait.

Kafka orders events per key; a parked event that the operator re-drives later must not arrive
after events of its key that were written after it. So when an event of (aggregate_type,
aggregate_id) is parked, the key is *held*: every later event of the key is parked too, with the
reason "held behind <id>", while other keys flow. `outbox parked retry` re-queues a key's parked
events together, in their original order, and the hold ends when the first of them (the one
the key is held behind) comes back: the rest follow it in order, then the key's new events.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

from outbox.record import OutboxRecord

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (aggregate_type, aggregate_id)

HELD_PREFIX = "held behind "
# How often an idle relay reads the held keys again from its parked events.
REFRESH_INTERVAL = 5.0


def key_of(record: OutboxRecord) -> Key:
    return (record.aggregate_type, record.aggregate_id)


class KeyHolds:
    """The held keys, each with the id of the first parked event it waits behind."""

    def __init__(self, held: Iterable[tuple[Key, uuid.UUID]] = ()) -> None:
        # Key -> the event it waits behind; empty nearly always (the publisher tests it per event).
        self.behind: dict[Key, uuid.UUID] = {}
        for key, behind in held:  # the first of a key is the one it waits behind
            self.hold(key, behind)

    def __len__(self) -> int:
        return len(self.behind)

    def __contains__(self, key: object) -> bool:
        return key in self.behind

    def reason_to_park(self, record: OutboxRecord) -> str | None:
        """Why `record` must be parked because of its key, or None when it may be sent.

        The event the key waits behind coming back (re-queued by `outbox parked retry`) ends
        the hold: it is sent, and its followers after it.
        """
        behind = self.behind.get((record.aggregate_type, record.aggregate_id))
        if behind is None:
            return None
        if behind == record.id:
            del self.behind[(record.aggregate_type, record.aggregate_id)]
            return None
        return f"{HELD_PREFIX}{behind}"

    def parked(self, record: OutboxRecord) -> None:
        """`record` was parked: its key waits behind it, unless it already waits."""
        self.hold(key_of(record), record.id)

    def hold(self, key: Key, behind: uuid.UUID) -> None:
        self.behind.setdefault(key, behind)


def log_parked(reason: str, **where: object) -> None:
    """Log a parked event: an error when Kafka refused it, a warning when its key was held."""
    if reason.startswith(HELD_PREFIX):
        log.warning("event parked behind an earlier parked event of its key", extra={
            "event": "event_held", "reason": reason, **where})
    else:
        log.error("event parked: it can never be published", extra={
            "event": "event_parked", "reason": reason, **where})


class Holding(Protocol):
    holds: KeyHolds


class HoldRefresh:
    """Call while idle (nothing in flight, nothing waiting to be parked): now and then the held
    keys are read again from the parked events, so that a key whose parked events an operator
    deleted, or re-queued while the relay was busy elsewhere, flows again without a restart.
    A key is held exactly while it has parked events."""

    def __init__(self, load: Callable[[], KeyHolds], publisher: Holding) -> None:
        self.load = load
        self.publisher = publisher
        self._refreshed = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._refreshed < REFRESH_INTERVAL:
            return
        fresh = self.load()
        for key in self.publisher.holds.behind.keys() - fresh.behind.keys():
            log.info("key released: it has no parked events any more", extra={
                "event": "key_released", "aggregate_type": key[0], "aggregate_id": key[1]})
        self.publisher.holds = fresh
        self._refreshed = time.monotonic()

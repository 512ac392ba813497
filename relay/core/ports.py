"""The relay core's two ports: a `Source` the events come from, a `Sink` they go to.

The core (`relay/core/loop.py`) drives both and owns what every relay does the same way; a
source (`relay/poll/`, `relay/wal/`, `relay/mongo/`) implements only `Source`, a sink
(`relay/sinks/kafka/`) only `Sink`. Tokens are the source's own: the sink hands each event's
token back with its outcome, and the core hands them back to the source to apply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from outbox.record import OutboxRecord
from relay.core.holds import KeyHolds

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Delivery(NamedTuple):
    """The outcome of one send: `error` is None on success; `permanent` errors are for parking.

    A named tuple: one is made per event on the hot path, where a frozen dataclass costs more.
    """

    record: OutboxRecord
    topic: str
    error: str | None = None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class Refused(NamedTuple):
    """An event to park: refused for good by the sink, or unreadable at the source (no record)."""

    token: Any
    reason: str
    record: OutboxRecord | None = None


OnDelivery = Callable[[Any, Delivery], None]
# Successes only, as (token, topic): the cheapest report, for a source that needs no record back.
OnDelivered = Callable[[Any, str], None]


class Sink(Protocol[T_contra]):
    """Where events are published. `send` never raises for one bad event: every outcome comes
    back through the callbacks the sink was built with, from `poll`, `flush` or `send` itself:
    delivered, refused for good (`permanent`: which failures are, is the sink's knowledge), or
    failed for a reason a restart may cure. A refused event holds its key (`holds`): the key's
    later events are refused too, "held behind" it, so parking keeps per-key order."""

    in_flight: int
    holds: KeyHolds
    on_wait: Callable[[], None]  # called while `send` waits for room; may raise to end the wait

    def send(self, record: OutboxRecord, token: T_contra) -> None: ...

    def poll(self, timeout: float = 0.0) -> int: ...

    def flush(self, timeout: float) -> int: ...

    def purge(self) -> None: ...

    def broker_reachable(self, timeout: float) -> bool: ...


# Builds a sink reporting to the core: (on_delivery, on_delivered or None) -> sink.
SinkFactory = Callable[[OnDelivery, OnDelivered | None], Sink[Any]]


@dataclass(frozen=True)
class Cadence:
    """How the core paces a source."""

    # Room the source needs to read: it reads while in_flight + room <= max_in_flight.
    room: int
    # Events sent and not yet answered: bounds memory while the sink is slow.
    max_in_flight: int
    # Delivered events are applied to the source at most this often (unless forced); 0: always.
    ack_interval: float
    # On stop: how long to wait for outstanding deliveries before ending without their answer.
    shutdown_timeout: float


class Source(Protocol[T]):
    """Where events come from, in the source's order, each with a token of the source's own."""

    name: str  # as in `--source`, for the logs
    cadence: Cadence
    # Whether the core should observe each delivered record's age (its created_at); a source
    # that observes its latency per group itself (the WAL relay, per transaction) says False.
    latency_per_event: bool
    # After a failed delivery: what the next run does (ends the error's message).
    after_failure: str
    # The last `read` found everything there was: the core settles, then idles.
    caught_up: bool
    # `read` itself waits for new changes (a stream): the core then does not wait for the
    # sink's answers before reading again.
    read_waits: bool

    def open(self, stop: threading.Event) -> AbstractContextManager[bool]:
        """Connect and wait as a standby until this relay leads: yields True then, False if
        stopped first. Leaving it releases the lead and the connections; it turns the source's
        connection errors into relay errors."""
        ...

    def held_keys(self) -> KeyHolds:
        """The keys with parked events, each held behind its first one."""
        ...

    def read(self, sink: Sink[T], park: Callable[[Refused], None], busy: bool) -> int:
        """Read the next changes and send each event to `sink` with its token, or `park` it;
        returns the number of events read. `busy`: events are in flight (do not wait long)."""
        ...

    def apply(self, delivered: list[T], refused: list[Refused]) -> None:
        """Write the answers: park `refused` (before removing anything), then remove or mark
        `delivered`. Each is done from then on."""
        ...

    def confirm(self, *, final: bool) -> None:
        """Confirm the source's position up to what is done (relay/core/watermark.py), at the
        source's own pace; all of it when `final` (the run ends). Called at every settle, with
        or without answers."""
        ...

    def where(self, token: T) -> Mapping[str, object]:
        """Where an event is stored, for the log line of its parking."""
        ...

    def keep_alive(self) -> None:
        """Keep the session (replication status, lease) alive while the core waits for the sink."""
        ...

    def on_caught_up(self) -> None:
        """Everything read is settled: periodic upkeep (retention)."""
        ...

    def wait_for_more(self, stop: threading.Event) -> None:
        """Idle: wait (bounded) for new changes."""
        ...

    def finish(self, unacknowledged: int) -> None:
        """On stop, after the drain: end cleanly (confirm what was cleaned, log)."""
        ...

    def abandon(self, *, blocked: bool) -> None:
        """The run ends without a drain: stopped while the sink was blocked, or failed."""
        ...


def while_open(value: T | None) -> T:
    """What a source holds only inside its `open` (a connection, a store, a lease)."""
    assert value is not None, "the source is not open"
    return value

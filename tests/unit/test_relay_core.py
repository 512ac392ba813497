"""The relay core (relay/core/loop.py) with the in-memory source and sink of relay/core/testing.py:
triage, cadence, parking with the per-key hold, the failure latch, and stop, without a server."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from outbox.record import OutboxRecord
from relay.core.loop import RelayCore
from relay.core.ports import OnDelivered, OnDelivery
from relay.core.testing import MemorySink, MemorySource, StopWhen
from relay.errors import DeliveryFailedError, StoppedWhileBlocked
from relay.stats import RelayStats


def record(n: int, key: str | None = None, aggregate_type: str = "orders") -> OutboxRecord:
    return OutboxRecord(uuid.UUID(int=n + 1), aggregate_type, key or f"k{n}", "E", b"{}",
                        "application/json")


class Wired:
    """A core over a MemorySource, with the MemorySink it builds kept for the assertions."""

    def __init__(self, source: MemorySource, **sink: Any) -> None:
        self.source = source
        self.stats = RelayStats()
        self.sink_options = sink
        self.sinks: list[MemorySink[Any]] = []
        self.core = RelayCore(source, self._sink, self.stats)

    def _sink(self, on_delivery: OnDelivery, on_delivered: OnDelivered | None) -> MemorySink[Any]:
        made = MemorySink[Any](on_delivery, on_delivered)
        for name, value in self.sink_options.items():
            setattr(made, name, value)
        self.sinks.append(made)
        return made

    @property
    def sink(self) -> MemorySink[Any]:
        return self.sinks[-1]

    def run_until(self, condition: Callable[[], bool]) -> None:
        self.core.run(StopWhen(condition))
        assert condition(), "the core stopped before the condition held"


def test_every_event_is_delivered_applied_and_confirmed_in_order() -> None:
    records = [record(n) for n in range(95)]
    wired = Wired(MemorySource(records, batch=10))
    wired.run_until(lambda: wired.source.confirmed == 95)
    assert wired.sink.delivered == records
    assert sorted(r.id.int for r in wired.source.applied) == [r.id.int for r in records]
    assert sum(wired.stats.published.values()) == 95
    assert wired.stats.batch_events == 95
    assert wired.source.finished == 0  # drained on stop: nothing left unanswered


def test_reading_stops_while_the_sink_has_no_room() -> None:
    wired = Wired(MemorySource([record(n) for n in range(50)], batch=10, max_in_flight=20),
                  paused=True)
    wired.core.run(StopWhen(lambda: bool(wired.sinks) and wired.sink.in_flight >= 20,
                            timeout=1.0))
    assert wired.source.read_up_to == 20, "read beyond max_in_flight while nothing was answered"
    assert wired.source.confirmed == 0 and wired.source.applied == []


def test_a_refused_event_is_parked_and_holds_its_key_while_other_keys_flow() -> None:
    first, later = record(0, key="a"), record(2, key="a")
    other = record(1, key="b")
    wired = Wired(MemorySource([first, other, later], batch=1),
                  refuse={first.id: ("too large", True)})
    wired.run_until(lambda: wired.source.confirmed == 3)
    assert [r for r, _ in wired.source.parked] == [first, later]
    assert wired.source.parked[1][1] == f"held behind {first.id}"
    assert wired.sink.delivered == [other]
    assert wired.stats.parked == 2


def test_the_held_keys_are_read_from_the_source_when_the_run_starts() -> None:
    source = MemorySource([record(0, key="a"), record(1, key="b")], batch=5)
    held_behind = uuid.uuid4()
    source.held.hold(("orders", "a"), held_behind)
    wired = Wired(source)
    wired.run_until(lambda: wired.source.confirmed == 2)
    assert wired.source.parked == [(record(0, key="a"), f"held behind {held_behind}")]
    assert wired.sink.delivered == [record(1, key="b")]


def test_an_event_the_source_cannot_read_is_parked_without_being_sent() -> None:
    source = MemorySource([record(0), record(1)], batch=5)
    source.unreadable = {0}
    wired = Wired(source)
    wired.run_until(lambda: wired.source.confirmed == 2)
    assert wired.source.parked == [(record(0), "unreadable")]
    assert wired.sink.sent == [record(1)]


def test_a_failed_delivery_ends_the_run_after_what_was_delivered_is_applied() -> None:
    records = [record(n) for n in range(6)]
    wired = Wired(MemorySource(records, batch=6), refuse={records[3].id: ("timed out", False)})
    with pytest.raises(DeliveryFailedError, match="timed out; unacknowledged events will be"):
        wired.core.run(StopWhen(lambda: False))
    applied = {r.id for r in wired.source.applied}
    assert applied == {r.id for r in records} - {records[3].id}
    assert wired.source.confirmed == 0, "confirmed past an event that was not delivered"
    assert wired.source.abandoned is False
    assert wired.stats.delivery_errors == 1


def test_delivered_events_wait_for_the_cadence_unless_the_source_is_caught_up() -> None:
    source = MemorySource([record(n) for n in range(40)], batch=10, ack_interval=3600.0)
    wired = Wired(source)
    applied_while_reading: list[int] = []
    read = source.read

    def reading(*args: Any) -> int:
        applied_while_reading.append(len(source.applied))
        return read(*args)

    source.read = reading  # type: ignore[method-assign]
    wired.run_until(lambda: source.confirmed == 40)
    assert applied_while_reading[:4] == [0, 0, 0, 0], "applied before the cadence was due"
    assert len(source.applied) == 40  # applied once caught up


def test_a_stop_while_the_sink_is_blocked_ends_the_wait_and_drops_what_it_holds() -> None:
    stop = threading.Event()

    class Blocking(MemorySink[Any]):
        def send(self, record: OutboxRecord, token: Any) -> None:
            super().send(record, token)
            if len(self.sent) == 3:  # the local queue is full: `send` waits, serving `on_wait`
                stop.set()
                self.on_wait()

    source = MemorySource([record(n) for n in range(10)], batch=10)
    stats = RelayStats()
    sinks: list[Blocking] = []

    def make(on_delivery: OnDelivery, on_delivered: OnDelivered | None) -> Blocking:
        sinks.append(Blocking(on_delivery, on_delivered))
        sinks[-1].paused = True
        return sinks[-1]

    RelayCore(source, make, stats).run(stop)
    assert source.abandoned is True
    assert sinks[0].purged == 3
    assert source.applied == [] and source.confirmed == 0


def test_stopped_while_blocked_is_only_raised_once_stop_is_set() -> None:
    from relay.core.loop import waiting

    stop = threading.Event()
    alive: list[int] = []
    on_wait = waiting(stop, lambda: alive.append(1))
    on_wait()
    stop.set()
    with pytest.raises(StoppedWhileBlocked):
        on_wait()
    assert alive == [1, 1]


def test_an_idle_core_waits_on_the_source_and_confirms_nothing_new() -> None:
    source = MemorySource([], batch=10)
    wired = Wired(source)
    wired.run_until(lambda: source.waits >= 3)
    assert source.confirmed == 0 and wired.sink.sent == []
    assert wired.stats.in_flight == 0


def test_a_standby_that_is_stopped_builds_no_sink() -> None:
    source = MemorySource([record(0)])
    wired = Wired(source)
    stop = threading.Event()
    stop.set()
    wired.core.run(stop)
    assert wired.sinks == []

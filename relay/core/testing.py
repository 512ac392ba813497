"""In-memory implementations of the core's ports, for tests that need no server: a sink that
keeps what it was sent and answers when polled, a source over a list of records, and a stop
event that sets itself."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from outbox.record import OutboxRecord
from relay.core.holds import KeyHolds
from relay.core.ports import Cadence, Delivery, OnDelivered, OnDelivery, Refused, Sink
from relay.core.watermark import Group, Watermark
from relay.sinks.kafka.settings import valid_topic
from relay.sinks.kafka.sink import topic_for

T = TypeVar("T")


class StopWhen(threading.Event):
    """A stop event that sets itself once `condition` holds (or after `timeout`), so a relay
    can run on the test's own thread, deterministically."""

    def __init__(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        super().__init__()
        self.condition = condition
        self.deadline = time.monotonic() + timeout

    def is_set(self) -> bool:
        if not super().is_set() and (self.condition() or time.monotonic() > self.deadline):
            self.set()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        return super().wait(min(timeout or 0.01, 0.01)) or self.is_set()


class MemorySink(Generic[T]):
    """A sink that keeps what it was sent; `poll` answers unless `paused`.

    `refuse[event_id] = (error, permanent)` makes that event's delivery fail. Topics are named
    and checked as the Kafka sink names and checks them; a refused event holds its key.
    """

    def __init__(
        self,
        on_delivery: OnDelivery,
        on_delivered: OnDelivered | None = None,
        topic_template: str = "{aggregate_type}",
    ) -> None:
        self._on_delivery = on_delivery
        self._on_delivered = on_delivered
        self.topic_template = topic_template
        self.sent: list[OutboxRecord] = []
        self.delivered: list[OutboxRecord] = []
        self.refuse: dict[Any, tuple[str, bool]] = {}
        self.paused = False
        self.purged = 0
        self.on_wait: Callable[[], None] = lambda: None
        self.holds = KeyHolds()
        self._queue: deque[tuple[OutboxRecord, T, str]] = deque()
        self.in_flight = 0

    def _refused(self, token: T, delivery: Delivery) -> None:
        self.holds.parked(delivery.record)
        self._on_delivery(token, delivery)

    def send(self, record: OutboxRecord, token: T) -> None:
        topic = topic_for(record, self.topic_template)
        if not valid_topic(topic):
            self._refused(token, Delivery(
                record, topic, f"invalid topic name {topic!r}", permanent=True))
            return
        reason = self.holds.reason_to_park(record)
        if reason is not None:
            self._on_delivery(token, Delivery(record, topic, reason, permanent=True))
            return
        self.sent.append(record)
        self._queue.append((record, token, topic))
        self.in_flight += 1

    def poll(self, timeout: float = 0.0) -> int:
        if self.paused:
            return 0
        served = 0
        while self._queue:
            record, token, topic = self._queue.popleft()
            self.in_flight -= 1
            served += 1
            refused = self.refuse.get(record.id)
            if refused is not None:
                delivery = Delivery(record, topic, refused[0], permanent=refused[1])
                if delivery.permanent:
                    self._refused(token, delivery)
                else:
                    self._on_delivery(token, delivery)
            else:
                self.delivered.append(record)
                if self._on_delivered is not None:
                    self._on_delivered(token, topic)
                else:
                    self._on_delivery(token, Delivery(record, topic))
        return served

    def flush(self, timeout: float) -> int:
        self.poll()
        return self.in_flight

    def purge(self) -> None:
        self.purged += len(self._queue)
        while self._queue:
            record, token, topic = self._queue.popleft()
            self.in_flight -= 1
            self._on_delivery(token, Delivery(record, topic, "Purged in queue"))

    def broker_reachable(self, timeout: float) -> bool:
        return not self.paused


class MemorySource:
    """A source over a list of records, read `batch` at a time, each batch a group of the
    watermark ending at its index (`confirmed`: the index confirmed so far, in order)."""

    name = "memory"
    latency_per_event = True
    read_waits = False
    after_failure = "unacknowledged events will be sent again"

    def __init__(self, records: list[OutboxRecord], *, batch: int = 10,
                 max_in_flight: int = 100, ack_interval: float = 0.0) -> None:
        self.records = records
        self.batch = batch
        self.cadence = Cadence(room=batch, max_in_flight=max_in_flight,
                               ack_interval=ack_interval, shutdown_timeout=1.0)
        self.caught_up = False
        self.read_up_to = 0
        self.groups: Watermark[int] = Watermark()
        self.applied: list[OutboxRecord] = []  # delivered, in the order applied
        self.parked: list[tuple[OutboxRecord | None, str]] = []
        self.confirmed = 0
        self.held = KeyHolds()
        self.finished: int | None = None
        self.abandoned: bool | None = None
        self.waits = 0
        self.unreadable: set[int] = set()  # indexes of records the source parks itself

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        yield not stop.is_set()

    def held_keys(self) -> KeyHolds:
        return self.held

    def read(self, sink: Sink[tuple[Group[int], OutboxRecord]],
             park: Callable[[Refused], None], busy: bool) -> int:
        chunk = self.records[self.read_up_to:self.read_up_to + self.batch]
        for offset, record in enumerate(chunk):
            token = (self.groups.sent(), record)
            if self.read_up_to + offset in self.unreadable:
                park(Refused(token, "unreadable"))
            else:
                sink.send(record, token)
        self.read_up_to += len(chunk)
        if chunk:
            self.groups.close(self.read_up_to)
        self.caught_up = len(chunk) < self.batch
        return len(chunk)

    def apply(self, delivered: list[tuple[Group[int], OutboxRecord]],
              refused: list[Refused]) -> None:
        for parking in refused:
            group, record = parking.token
            self.parked.append((record if parking.record is None else parking.record,
                                parking.reason))
            self.groups.done(group)
        for group, record in delivered:
            self.applied.append(record)
            self.groups.done(group)

    def confirm(self, *, final: bool) -> None:
        for group in self.groups.pop_done():
            assert group.position is not None
            self.confirmed = group.position

    def where(self, token: tuple[Group[int], OutboxRecord]) -> Mapping[str, object]:
        return {"id": str(token[1].id)}

    def keep_alive(self) -> None:
        pass

    def on_caught_up(self) -> None:
        pass

    def wait_for_more(self, stop: threading.Event) -> None:
        self.waits += 1
        stop.wait(0.001)

    def finish(self, unacknowledged: int) -> None:
        self.finished = unacknowledged

    def abandon(self, *, blocked: bool) -> None:
        self.abandoned = blocked

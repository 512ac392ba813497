"""The relay core: one loop that drives a `Source` into a `Sink` (relay/core/ports.py).

It owns what every relay does the same way, whatever the source:

- **triage** of the sink's answers: delivered, refused for good (parked, its key held), or
  failed (latched: the run ends once what was done is applied, relay/core/outcomes.py);
- the **cadence**: read while there is room in flight, apply delivered events at most every
  `ack_interval` (refusals at once), confirm the source at every settle;
- **idle** work: a settle with nothing outstanding, the source's upkeep, the broker check, the
  held keys read again (relay/core/holds.py), then the source's own wait;
- **stop**: drain (bounded), apply, confirm; or, stopped while the sink was blocked or on a
  failure, drop what the sink still holds so nothing is sent behind the next run's back.

The source decides what its positions are and how answers are written
(relay/core/watermark.py is the rule for confirming them in order).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from relay.core.holds import HoldRefresh, log_parked
from relay.core.outcomes import BrokerCheck, FailureLatch
from relay.core.ports import Delivery, Refused, Sink, SinkFactory, Source
from relay.errors import StoppedWhileBlocked
from relay.stats import RelayStats

log = logging.getLogger(__name__)

T = TypeVar("T")

# Delivered events applied at once, whatever the cadence: bounds the answers held in memory.
APPLY_AT_MOST = 10_000


def waiting(
    stop: threading.Event, keep_alive: Callable[[], None] = lambda: None
) -> Callable[[], None]:
    """A sink's `on_wait`: keeps the source alive while `send` waits, and ends the wait
    (StoppedWhileBlocked) once `stop` is set, so a stop never waits for an absent broker."""

    def on_wait() -> None:
        keep_alive()
        if stop.is_set():
            raise StoppedWhileBlocked

    return on_wait


class RelayCore(Generic[T]):
    """A relay: `run` until `stop`; raises a RelayError whose `restart` says whether the
    supervisor starts it again (relay/errors.py)."""

    def __init__(self, source: Source[T], sink_factory: SinkFactory, stats: RelayStats) -> None:
        self.source = source
        self.sink_factory = sink_factory
        self.stats = stats
        self.failures = FailureLatch(stats)
        self._published = stats.published
        self._delivered: list[T] = []
        self._refused: list[Refused] = []
        self._last_apply = time.monotonic()

    # -- triage (called from the sink's poll/flush/send on this thread) -------------------------

    def _on_delivered(self, token: T, topic: str) -> None:
        # Once per event, for a source observing latency itself: count it, keep its token.
        self._published[topic] += 1
        self._delivered.append(token)

    def _on_delivery(self, token: T, delivery: Delivery) -> None:
        if delivery.error is None:
            self._delivered.append(token)
            self.stats.delivered_record(delivery.topic, delivery.record.created_at)
        elif delivery.permanent:
            self._refused.append(Refused(token, delivery.error, delivery.record))
        else:
            self.failures.failed(delivery)

    def park(self, refused: Refused) -> None:
        """The source found an event it can never publish: parked at the next settle."""
        self._refused.append(refused)

    # -- the run ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        source = self.source
        with source.open(stop) as leading:
            if not leading:
                return
            sink: Sink[T] = self.sink_factory(
                self._on_delivery, None if source.latency_per_event else self._on_delivered)
            sink.holds = source.held_keys()
            # The source lives on while the sink is full; a stop ends the wait for the broker.
            sink.on_wait = waiting(stop, source.keep_alive)
            sink.broker_reachable(timeout=5.0)
            try:
                self._loop(sink, stop)
                unacknowledged = sink.flush(source.cadence.shutdown_timeout)
                self.settle(force=True, final=True)
                source.finish(unacknowledged)
            except StoppedWhileBlocked:
                # Nothing unanswered was applied or confirmed: the next run sends it again.
                self._abandon(sink)
                source.abandon(blocked=True)
            except BaseException:
                self._abandon(sink)
                source.abandon(blocked=False)
                raise

    def _loop(self, sink: Sink[T], stop: threading.Event) -> None:
        source, stats, cadence = self.source, self.stats, self.source.cadence
        check_broker = BrokerCheck(sink)
        refresh_holds = HoldRefresh(source.held_keys, sink)
        read, room, limit = source.read, cadence.room, cadence.max_in_flight
        while not stop.is_set():
            found = 0
            if sink.in_flight + room <= limit:
                found = read(sink, self.park, sink.in_flight > 0)
                if found:
                    stats.batches += 1
                    stats.batch_events += found
            else:
                source.keep_alive()  # backpressure: the sink is slow or away
                sink.poll(0.05)
            sink.poll(0)
            self.settle(force=False)
            stats.in_flight = sink.in_flight
            if source.caught_up:
                if sink.in_flight:
                    if not source.read_waits:
                        sink.poll(0.005)  # serve answers rather than read again at once
                else:
                    self.settle(force=True)
                    stats.progressed()
                    source.on_caught_up()
                    if not found:
                        check_broker()
                        refresh_holds()
                        source.wait_for_more(stop)

    def settle(self, *, force: bool, final: bool = False) -> None:
        """Apply the answers (refusals at once, deliveries at the cadence or when `force`d),
        confirm the source (all that is done, when `final`: the run ends), and end the run on a
        latched failure once what was done is applied."""
        source = self.source
        refused, delivered = self._refused, self._delivered
        due = (
            refused
            or force
            or len(delivered) >= APPLY_AT_MOST
            or self.failures.first is not None
            or time.monotonic() - self._last_apply >= source.cadence.ack_interval
        )
        if due and (delivered or refused):
            self._refused, self._delivered = [], []
            source.apply(delivered, refused)
            self._last_apply = time.monotonic()
            self.stats.progressed()
            for parking in refused:
                self.stats.parked += 1
                log_parked(parking.reason, **source.where(parking.token))
        source.confirm(final=final)
        self.failures.raise_if_failed(source.after_failure)

    def _abandon(self, sink: Sink[Any]) -> None:
        try:
            sink.purge()
        except Exception as exc:  # the run is over anyway; the next one sends everything again
            log.debug("purge failed", extra={"event": "purge_failed", "error": str(exc)})

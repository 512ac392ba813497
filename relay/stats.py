"""Counters every relay keeps while it runs; the metrics and health endpoints read them."""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Commit-to-Kafka latency buckets (seconds), for the Prometheus histogram.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """A fixed-bucket histogram cheap enough for the per-event hot path."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.total += value * count

    def cumulative(self) -> list[tuple[str, int]]:
        running, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


# The console's events/s chart: delivered events per 5 s over the last 5 minutes.
THROUGHPUT_INTERVAL = 5.0
THROUGHPUT_SLOTS = 60


class Throughput:
    """Events delivered per interval over the last minutes, for the console's chart.

    Sampled by a clock (the metrics server's), never per event: a sample is the running total
    of deliveries the stats already keep, so the hot path pays nothing for the chart.
    """

    def __init__(self, slots: int = THROUGHPUT_SLOTS) -> None:
        self._totals: deque[tuple[float, int]] = deque(maxlen=slots + 1)

    def sample(self, total: int, now: float) -> None:
        """The running total of deliveries at monotonic time `now`."""
        self._totals.append((now, total))

    def rates(self) -> list[float]:
        """Events per second in each interval between samples, oldest first."""
        samples = list(self._totals)
        return [max(0, total - before) / (now - then) if now > then else 0.0
                for (then, before), (now, total) in itertools.pairwise(samples)]


@dataclass(frozen=True)
class LabelledGauge:
    """One gauge family with one label: `outbox_<name>{<label>="<key>"} <value>` per entry."""

    name: str
    help: str
    label: str
    values: dict[str, float]


@dataclass
class RelayStats:
    """Written by the relay thread only; read (racily, which is fine for gauges) by scrapes."""

    source: str = ""
    published: Counter[str] = field(default_factory=Counter)  # by topic
    parked: int = 0
    delivery_errors: int = 0
    restarts: int = 0
    batches: int = 0
    batch_events: int = 0
    in_flight: int = 0
    leader: bool = False
    source_connected: bool = False
    broker_connected: bool = False
    last_published_at: float | None = None
    last_progress_at: float = field(default_factory=time.monotonic)
    latency: Histogram = field(default_factory=Histogram)
    # Source-specific gauges (backlog, slot lag...), evaluated at scrape time.
    gauges: dict[str, Callable[[], float | None]] = field(default_factory=dict)
    # Gauges with a label (per shard, per shard group), evaluated at scrape time: each probe
    # answers several families from one read (relay/shard_metrics.py).
    labelled: dict[str, Callable[[], list[LabelledGauge]]] = field(default_factory=dict)
    # postgres-wal: lost slots recovered (relay/wal/recovery.py); the slot's WAL against its
    # budget (relay/wal/budget.py): None without a budget or before the first check.
    slot_recoveries: int = 0
    # postgres-wal: events the server sent again that were acknowledged before (relay/wal/
    # position.py), not published twice.
    wal_skipped: int = 0
    slot_retained_bytes: int | None = None
    slot_over_budget: bool | None = None
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def delivered_total(self) -> int:
        """Events acknowledged by Kafka since the relay started, all topics."""
        return sum(list(self.published.values()))

    def delivered(self, topic: str, created_at: float | None) -> None:
        """One successful delivery report; `created_at` is the event's Unix time, if known."""
        self.published[topic] += 1
        now = time.time()
        self.last_published_at = now
        self.last_progress_at = time.monotonic()
        self.broker_connected = True
        if created_at is not None:
            self.latency.observe(max(0.0, now - created_at))

    def delivered_record(self, topic: str, created_at: dt.datetime | None) -> None:
        """`delivered`, for an event whose creation time came with it (or not)."""
        self.delivered(topic, created_at.timestamp() if created_at else None)

    def delivered_transaction(self, events: int, committed_at: float) -> None:
        """The last delivery report of a transaction's `events` (already counted per topic)
        came; `committed_at` is its commit's Unix time. Cheaper than `delivered` per event."""
        now = time.time()
        self.last_published_at = now
        self.last_progress_at = time.monotonic()
        self.broker_connected = True
        self.latency.observe(max(0.0, now - committed_at), events)

    def progressed(self) -> None:
        """Acknowledgements moved (deliveries, parkings), or nothing is waiting for one."""
        self.last_progress_at = time.monotonic()

"""Counters every relay keeps while it runs; metrics and health endpoints read them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RelayStats:
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
    acknowledged_position: str | None = None
    # Commit-to-Kafka latencies (seconds) since the last scrape; the metrics module drains them.
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self, topic: str, latency: float | None) -> None:
        self.published[topic] += 1
        self.last_published_at = time.time()
        self.last_progress_at = time.monotonic()
        if latency is not None and len(self.latencies) < 100_000:
            self.latencies.append(latency)

    def progressed(self) -> None:
        self.last_progress_at = time.monotonic()

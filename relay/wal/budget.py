"""The WAL budget of the relay's slot (`--max-slot-wal`): how much WAL the slot may keep on the
database's disk while the relay is behind (the broker away, a long backlog).

Over budget the relay says so (metric, /readyz detail, a log line when the state changes). With
`--on-slot-loss recover` it then gives up its slot on purpose, before the server's
max_slot_wal_keep_size (or a full disk) takes it: the server frees the WAL at once, and the
events committed meanwhile stay in the outbox table, from where the recovery publishes them
(relay/wal/recovery.py). The price: the recovery reads them from the table instead of the log,
and events in flight at that moment are sent twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from relay.stats import RelayStats
from relay.wal import slots
from relay.wal.errors import SlotError

log = logging.getLogger(__name__)

# Seconds between looks at the slot: one catalog query, cheap; the WAL grows by at most a few
# hundred MB meanwhile on a busy server, so set the budget with that margin below the limit.
CHECK_INTERVAL = 5.0


class SlotBudgetExceededError(SlotError):
    """The slot retains more WAL than the relay's budget: the relay gave it up to recover."""


class SlotBudget:
    """Looks at the slot's retained WAL every CHECK_INTERVAL seconds (`check`)."""

    def __init__(self, slot: str, limit: int, stats: RelayStats, *, give_up: bool,
                 interval: float = CHECK_INTERVAL) -> None:
        self.slot = slot
        self.limit = limit
        self.stats = stats
        self.give_up = give_up  # --on-slot-loss recover: over budget, drop the slot
        self.interval = interval
        self._next = 0.0

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """When due: compare the slot's retained WAL with the budget; raise
        SlotBudgetExceededError when over it and allowed to give the slot up."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        status = slots.slot_status(conn, self.slot)
        retained = status.retained_bytes if status is not None else None
        if retained is None:
            return
        over = retained > self.limit
        stats = self.stats
        stats.slot_retained_bytes = retained
        if over != stats.slot_over_budget:
            level = logging.WARNING if over else logging.INFO
            log.log(level, "replication slot %s %s its WAL budget: %d of %d bytes retained",
                    self.slot, "is over" if over else "is within", retained, self.limit,
                    extra={"event": "slot_wal_budget", "slot": self.slot, "over": over,
                           "retained_bytes": retained, "budget_bytes": self.limit})
        stats.slot_over_budget = over
        if over and self.give_up:
            raise SlotBudgetExceededError(
                f"replication slot {self.slot} retains {retained} bytes of WAL, over the "
                f"budget of {self.limit} (--max-slot-wal): the relay drops it and recovers "
                "from the outbox table")

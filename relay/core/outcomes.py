"""What every relay does with Kafka's answers besides applying them to the source: remember the
first failure a restart may cure, and ask an idle broker whether it is still there."""

from __future__ import annotations

import time
from typing import Protocol

from relay.core.ports import Delivery
from relay.errors import DeliveryFailedError
from relay.stats import RelayStats

# While idle, the relay asks the broker for metadata this often (readiness reflects it).
BROKER_CHECK_INTERVAL = 5.0


class FailureLatch:
    """The first delivery that failed for a reason a restart may cure. The relay applies what
    was delivered and parked first, then `raise_if_failed` restarts it: everything not
    acknowledged is sent again, in order."""

    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats
        self.first: Delivery | None = None

    def failed(self, delivery: Delivery) -> None:
        self.stats.delivery_errors += 1
        if self.first is None:
            self.first = delivery

    def raise_if_failed(self, then: str) -> None:
        """Raise DeliveryFailedError naming the first failure and `then` (what happens next)."""
        first = self.first
        if first is not None:
            raise DeliveryFailedError(f"delivery to {first.topic} failed: {first.error}; {then}")


class Reachable(Protocol):
    def broker_reachable(self, timeout: float) -> bool: ...


class BrokerCheck:
    """Call while idle: at most every BROKER_CHECK_INTERVAL it asks for the broker's metadata,
    which sets the readiness's broker state (an idle relay sends nothing that would tell)."""

    def __init__(self, publisher: Reachable) -> None:
        self.publisher = publisher
        self._checked = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._checked > BROKER_CHECK_INTERVAL:
            self.publisher.broker_reachable(timeout=2.0)
            self._checked = time.monotonic()

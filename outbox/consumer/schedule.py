"""The consumer's run-loop decisions, without I/O: how many messages to fetch and how long to
wait for them, when a run is over, when to purge the inbox, how long to wait before sending
dead letters again. The sync and asyncio drivers ask; they only carry out the answers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from outbox.consumer.policy import RetryPolicy

# Kafka unavailable for dead letters: the wait grows like a handler retry's, up to this step.
_DEAD_LETTER_BACKOFF_CAP = 16


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fetch up to `limit` messages, waiting up to `wait` seconds for the first."""

    limit: int
    wait: float


class RunLimits:
    """The limits of one `run()`: `max_messages` resolved messages, `timeout` seconds."""

    def __init__(
        self,
        *,
        batch_size: int,
        poll_timeout: float,
        max_messages: int | None,
        timeout: float | None,
        now: float,
        longest_poll: float | None = None,
    ) -> None:
        self._batch_size = batch_size
        self._poll = poll_timeout if longest_poll is None else min(poll_timeout, longest_poll)
        self._max_messages = max_messages
        self._deadline = None if timeout is None else now + timeout
        self.done = 0

    def next_fetch(self, now: float) -> Fetch | None:
        """What to fetch next, or None when the run is over."""
        limit = self._batch_size
        if self._max_messages is not None:
            limit = max(0, min(limit, self._max_messages - self.done))
        if limit == 0:
            return None
        wait = self._poll
        if self._deadline is not None:
            wait = min(wait, self._deadline - now)
            if wait <= 0:
                return None
        return Fetch(limit, wait)

    def resolved(self, count: int) -> None:
        self.done += count


@dataclass
class PurgeSchedule:
    """Purge dedup rows older than `older_than` every `every` (never without `older_than`);
    the first purge comes with the first fetch."""

    older_than: dt.timedelta | None
    every: dt.timedelta
    next_at: float = 0.0

    def due(self, now: float) -> dt.timedelta | None:
        """The age to purge now, or None; a purge that is due is scheduled again."""
        if self.older_than is None or now < self.next_at:
            return None
        self.next_at = now + self.every.total_seconds()
        return self.older_than


def dead_letter_delay(policy: RetryPolicy, failures: int) -> float:
    """The wait after `failures` failed sends of a batch's dead letters (the offsets stay
    uncommitted meanwhile)."""
    return policy.delay(min(failures, _DEAD_LETTER_BACKOFF_CAP))

"""The WAL relay's transactions for the acknowledgement rule (relay/in_order.py): which commit
position may be confirmed.

Transactions arrive whole and in commit order (no streaming of in-progress transactions). The
slot may move to a transaction's end only when every event of that transaction and of all
earlier ones has a successful (or parked) delivery report.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.in_order import InOrder


@dataclass(slots=True)
class Transaction:
    outstanding: int = 0  # events handed to Kafka, not yet reported
    events: int = 0  # events handed to Kafka in all
    end_lsn: int | None = None  # known once its Commit has been read
    commit_time_us: int = 0  # from its Commit: microseconds since 2000-01-01 UTC
    xid: int = 0  # from its Commit: its rows in the outbox table are deleted by it


class CommitTracker:
    def __init__(self) -> None:
        self._queue: InOrder[Transaction] = InOrder()
        self._current = Transaction()
        self.outstanding = 0

    def event_sent(self) -> Transaction:
        """An event of the transaction being read was handed to Kafka; returns its token."""
        current = self._current
        current.outstanding += 1
        current.events += 1
        self.outstanding += 1
        return current

    def event_done(self, transaction: Transaction) -> None:
        """A delivery report succeeded (or the event was parked)."""
        transaction.outstanding -= 1
        self.outstanding -= 1

    def committed(self, end_lsn: int, commit_time_us: int = 0, xid: int = 0) -> None:
        """The Commit of the transaction being read: it is complete."""
        self._current.end_lsn = end_lsn
        self._current.commit_time_us = commit_time_us
        self._current.xid = xid
        self._queue.append(self._current)
        self._current = Transaction()

    def pop_done(self) -> list[Transaction]:
        """The committed transactions whose events, and all earlier ones', are done, oldest
        first; the slot may be confirmed up to the last one's `end_lsn`."""
        return self._queue.pop_done()

    @property
    def transactions_waiting(self) -> int:
        return len(self._queue)

"""The WAL relay's acknowledgement rule, without I/O: which commit position may be confirmed.

Transactions arrive whole and in commit order (no streaming of in-progress transactions). The
slot may move to a transaction's end only when every event of that transaction and of all
earlier ones has a successful (or parked) delivery report.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Transaction:
    outstanding: int = 0
    end_lsn: int | None = None  # known once its Commit has been read


class CommitTracker:
    def __init__(self) -> None:
        self._queue: deque[Transaction] = deque()
        self._current = Transaction()
        self.outstanding = 0

    def event_sent(self) -> Transaction:
        """An event of the transaction being read was handed to Kafka; returns its token."""
        self._current.outstanding += 1
        self.outstanding += 1
        return self._current

    def event_done(self, transaction: Transaction) -> None:
        """A delivery report succeeded (or the event was parked)."""
        transaction.outstanding -= 1
        self.outstanding -= 1

    def committed(self, end_lsn: int) -> None:
        """The Commit of the transaction being read: it is complete."""
        self._current.end_lsn = end_lsn
        self._queue.append(self._current)
        self._current = Transaction()

    def confirmable(self) -> int | None:
        """The highest end position whose transaction, and all earlier ones, are done."""
        position = None
        while self._queue and self._queue[0].outstanding == 0:
            position = self._queue.popleft().end_lsn
        return position

    @property
    def transactions_waiting(self) -> int:
        return len(self._queue)

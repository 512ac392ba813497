"""Which outbox rows the polling relay reads next: the position cursor and its late commits.

Rows are read in position (insertion) order. A transaction that had not completed when a page
was read may hold rows *below* the cursor; they become visible only when it commits. A snapshot
says which transactions had not completed: those listed as in progress (xip) and every id at or
above its xmax. So each read remembers its snapshot, and the next read also fetches the rows of
exactly those transactions below the cursor. The ones that committed in between show all their
rows (commit is atomic) and are never asked for again; the ones still running show nothing.
Nothing is skipped, nothing waits for a long transaction, and a rolled-back transaction's rows
are never visible at all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    xmax: str  # xid8 as text: ids at or above had not completed
    in_progress: tuple[str, ...]  # ids below xmax that had not completed


@dataclass(frozen=True)
class LateRows:
    snapshot: Snapshot
    ceiling: int  # the cursor when that snapshot was read: late rows lie at or below it


@dataclass
class PollCursor:
    after: int = 0
    previous: Snapshot | None = None

    def late_rows(self) -> LateRows | None:
        """Where rows of transactions incomplete at the last read may be, below the cursor."""
        if self.previous is None or self.after == 0:
            return None
        return LateRows(self.previous, self.after)

    def advance(self, snapshot: Snapshot, page_positions: list[int]) -> None:
        """Record a read: its snapshot, and the positions of the page read in it."""
        self.previous = snapshot
        if page_positions:
            self.after = max(self.after, page_positions[-1])

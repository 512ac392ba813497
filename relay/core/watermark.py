"""The acknowledgement rule, in one place and without I/O: a source is confirmed up to a position
only when everything handed out up to that position is done.

A source hands out work in its own order, in groups that each end at a position: a WAL
transaction ends at its commit LSN, a change-stream change at its resume token. Kafka answers the
events of the groups in any order across partitions; the source may be told the position of the
newest group that, with every group before it, has nothing outstanding. Resuming there sends
again what may not have arrived, and skips nothing (at least once, never lost).

An event is *done* when its delivery succeeded, or when it was parked; the source says when (the
WAL relay at once, the MongoDB stream once the entry's removal from its document is applied).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

P = TypeVar("P")


class Group(Generic[P]):
    """Handed-out work ending at `position` (None while it is still being read)."""

    __slots__ = ("events", "outstanding", "position")

    def __init__(self) -> None:
        self.outstanding = 0  # events handed out, not done yet
        self.events = 0  # events handed out in all
        self.position: P | None = None

    def __repr__(self) -> str:
        return f"Group({self.position!r}, {self.outstanding}/{self.events} outstanding)"


class Watermark(Generic[P]):
    """Groups in the order they were read. `sent` adds an event to the group being read and
    returns it (the event's token); `done` settles it; `close` ends the group at a position;
    `pop_done` takes the closed groups that may be confirmed, oldest first."""

    def __init__(self) -> None:
        self._closed: deque[Group[P]] = deque()
        self._open: Group[P] = Group()
        self.outstanding = 0  # over every group

    def sent(self) -> Group[P]:
        group = self._open
        group.outstanding += 1
        group.events += 1
        self.outstanding += 1
        return group

    def done(self, group: Group[P]) -> None:
        group.outstanding -= 1
        self.outstanding -= 1

    def close(self, position: P) -> Group[P]:
        """The group being read ends at `position`; the next event opens a new one."""
        group = self._open
        group.position = position
        self._closed.append(group)
        self._open = Group()
        return group

    def pop_done(self) -> list[Group[P]]:
        """The oldest closed groups with nothing outstanding, up to the first that still has
        some: the source may be confirmed up to the last one's position."""
        done = []
        closed = self._closed
        while closed and closed[0].outstanding == 0:
            done.append(closed.popleft())
        return done

    @property
    def waiting(self) -> int:
        """Closed groups not yet confirmable."""
        return len(self._closed)

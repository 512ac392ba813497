"""The acknowledgement rule every relay source shares, without I/O: a position may be confirmed
to the source only when everything handed out up to it is done.

A source hands out work in its own order (WAL transactions in commit order, change-stream
changes in stream order), each with some events in flight. Kafka answers events in any order
across partitions; what the source is told is the newest position whose group, and every group
before it, has nothing outstanding. `relay/wal/acks.py` (transactions, by LSN) and
`relay/mongo/tracker.py` (changes, by resume token) keep their groups here.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar


class Group(Protocol):
    """Handed-out work: done once nothing of it is outstanding."""

    @property
    def outstanding(self) -> int: ...


G = TypeVar("G", bound=Group)


class InOrder(Generic[G]):
    """Groups in the order they were handed out; `pop_done` takes the done prefix."""

    def __init__(self) -> None:
        self._groups: deque[G] = deque()

    def __len__(self) -> int:
        return len(self._groups)

    def append(self, group: G) -> None:
        self._groups.append(group)

    def pop_done(self) -> list[G]:
        """The oldest groups with nothing outstanding, up to the first that still has some:
        the source may be confirmed up to the last one returned."""
        done = []
        groups = self._groups
        while groups and groups[0].outstanding == 0:
            done.append(groups.popleft())
        return done

"""Which Kafka offsets may be committed: only past messages that are resolved (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable

from outbox.consumer.message import Position

TopicPartition = tuple[str, int]


class OffsetTracker:
    """Per partition: the fetched messages not yet resolved, and the next offset to commit.

    A message is resolved once its transaction committed, it was found a duplicate or ignored,
    or its dead letter was acknowledged by Kafka. The committable offset of a partition is its
    first unresolved message (everything before is done), else one past the last resolved one:
    a message left unresolved by a stop is delivered again, never skipped.
    """

    def __init__(self) -> None:
        # Insertion order is offset order: Kafka delivers a partition in order.
        self._unresolved: dict[TopicPartition, dict[int, None]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def fetched(self, position: Position) -> None:
        tp = (position.topic, position.partition)
        self._unresolved.setdefault(tp, {})[position.offset] = None

    def resolved(self, position: Position) -> None:
        tp = (position.topic, position.partition)
        pending = self._unresolved.get(tp)
        if pending is None or position.offset not in pending:
            # Fetched before its partition was revoked: its offset is the new owner's business.
            return
        del pending[position.offset]
        self._next[tp] = max(self._next.get(tp, -1), position.offset + 1)

    def committable(self, partitions: Iterable[TopicPartition] | None = None) -> dict[
        TopicPartition, int
    ]:
        """Offsets to commit (the next offset to read) that move a partition forward."""
        chosen = set(self._next) if partitions is None else set(partitions) & set(self._next)
        offsets = {}
        for tp in chosen:
            pending = self._unresolved.get(tp)
            position = next(iter(pending)) if pending else self._next[tp]
            position = min(position, self._next[tp])
            if position > self._committed.get(tp, -1):
                offsets[tp] = position
        return offsets

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """A partition was revoked or lost: what was fetched from it will be fetched again."""
        for tp in partitions:
            self._unresolved.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)

    def unresolved(self) -> int:
        return sum(len(pending) for pending in self._unresolved.values())

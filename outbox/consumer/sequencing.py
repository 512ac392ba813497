"""ordering="sequence": what the consumer decides from the writers' per-aggregate numbers (the
`sequence` header of Outbox(sequence=True)), and which messages wait for a missing one. No I/O.

Per aggregate (aggregate_type, aggregate_id) the inbox keeps the last number applied, in the
transaction of the dedup rows. A number at or below it is a duplicate (skipped); the next one is
applied; one beyond it is a gap: the message is held (with every later one of its aggregate,
which are gaps too) while the rest of the batch goes on, offered again with each batch that
follows, and dead-lettered (reason `gap: ...`) once it has waited `gap_timeout` seconds.
A message without a `sequence` header is applied as under ordering="none".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from outbox.consumer.message import Message, Position, Received

SEQUENCE_HEADER = "sequence"

AggregateKey = tuple[str, str]


def aggregate_key(message: Message) -> AggregateKey:
    return (message.aggregate_type, message.aggregate_id)


def sequence_of(message: Message) -> int | None:
    """The message's number; None without a header; ValueError when it is not a positive
    integer."""
    raw = message.headers.get(SEQUENCE_HEADER)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"the {SEQUENCE_HEADER!r} header {raw[:40]!r} is not a positive integer")
    return int(raw)


def in_sequence_order(work: Sequence[int], numbers: Mapping[int, tuple[AggregateKey, int]],
                      ) -> list[int]:
    """`work` (indices of a batch) with each aggregate's numbered messages sorted by number, in
    the places its messages held: a batch that holds a held message and the one it waited for
    applies both, in order. Other messages keep their places."""
    slots: dict[AggregateKey, list[int]] = {}
    for index in work:
        if index in numbers:
            slots.setdefault(numbers[index][0], []).append(index)
    sorted_slots = {key: iter(sorted(indices, key=lambda i: numbers[i][1]))
                    for key, indices in slots.items()}
    return [next(sorted_slots[numbers[index][0]]) if index in numbers else index
            for index in work]


class Verdict(enum.Enum):
    DUPLICATE = "duplicate"
    NEXT = "next"
    GAP = "gap"


class SequenceCheck:
    """The numbers of one transaction: what the inbox holds (`last`) and what it will hold once
    the messages judged NEXT are applied (`changed`)."""

    def __init__(self, last: Mapping[AggregateKey, int]) -> None:
        self._last = dict(last)
        self.changed: dict[AggregateKey, int] = {}

    def judge(self, key: AggregateKey, number: int) -> tuple[Verdict, int]:
        """The verdict on `number`, and the number that was expected."""
        expected = self._last.get(key, 0) + 1
        if number < expected:
            return Verdict.DUPLICATE, expected
        if number > expected:
            return Verdict.GAP, expected
        self._last[key] = number
        self.changed[key] = number
        return Verdict.NEXT, expected


def gap_reason(key: AggregateKey, expected: int, number: int) -> str:
    aggregate_type, aggregate_id = key
    return (f"gap: {aggregate_type} {aggregate_id} expected sequence {expected}, got {number} "
            "(the missing event did not arrive within gap_timeout)")


@dataclass(frozen=True, slots=True)
class NextBatch:
    """What to offer the engine: held messages first (fetched earlier), then new ones; the
    indices of held messages whose wait is over (a gap now dead-letters them)."""

    items: list[Received]
    expired: frozenset[int]


class GapHolds:
    """Messages held behind a gap, with the time their wait ends (monotonic seconds)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._held: dict[Position, tuple[Received, float]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def forget(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Drop what was held from partitions no longer assigned: the new owner reads them
        again from the committed offset, which never passed a held message."""
        keep = set(assigned)
        self._held = {position: value for position, value in self._held.items()
                      if (position.topic, position.partition) in keep}

    def next_batch(self, fetched: Sequence[Received], now: float) -> NextBatch:
        held = list(self._held.values())
        expired = frozenset(index for index, (_, until) in enumerate(held) if until <= now)
        if not fetched and not expired:
            # Nothing new arrived and no wait ended: there is nothing to decide again.
            return NextBatch([], frozenset())
        return NextBatch([item for item, _ in held] + list(fetched), expired)

    def wait(self, longest: float, now: float) -> float:
        """How long a fetch may wait: not past the end of the earliest hold."""
        if not self._held:
            return longest
        earliest = min(until for _, until in self._held.values())
        return max(0.0, min(longest, earliest - now))

    def settle(self, items: Sequence[Received], held: Iterable[int], now: float) -> list[int]:
        """After a batch: `held` (indices into `items`) wait on; a message held before keeps
        the end of its wait. Returns the indices of those held for the first time."""
        before = self._held
        self._held = {}
        new = []
        for index in sorted(held):
            item = items[index]
            previous = before.get(item.position)
            if previous is None:
                new.append(index)
            until = previous[1] if previous is not None else now + self.timeout
            self._held[item.position] = (item, until)
        return new

"""The ledger check of RELIABILITY.md: lost, phantom, duplicates and per-key order of a run.

What the writers did is recorded (event id -> key, the event's number within its key, committed
or rolled back); what Kafka holds is fed in, in the order it was read, and the verdict compares
the two. No I/O: `outbox verify`, the tests and the benchmark all use this one check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Ledger:
    """What the writers did: event id -> (key, sequence number within the key, committed?).

    Writers number each key's events in the order they commit them (a key belongs to one writer
    at a time), so a key's first deliveries must come in increasing number. An event whose
    commit outcome is unknown (the connection broke during COMMIT) is `in_doubt`: it may be
    delivered or not, and counts neither as lost nor as phantom.
    """

    entries: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    in_doubt: set[str] = field(default_factory=set)

    def record(self, event_id: str, key: str, seq: int, committed: bool) -> None:
        self.entries[event_id] = (key, seq, committed)

    def doubt(self, event_id: str, key: str, seq: int) -> None:
        self.entries[event_id] = (key, seq, False)
        self.in_doubt.add(event_id)

    @property
    def committed_ids(self) -> set[str]:
        return {i for i, (_, _, ok) in self.entries.items() if ok}

    @property
    def rolled_back(self) -> int:
        return sum(1 for i, (_, _, ok) in self.entries.items() if not ok) - len(self.in_doubt)

    def check(self, delivered: Iterable[str]) -> Verdict:
        """The verdict over the event ids found in Kafka, in the order they were read."""
        checker = LedgerCheck(self)
        for event_id in delivered:
            checker.see(event_id)
        return checker.verdict()


class LedgerCheck:
    """Fed every delivered event id (`see`), one at a time, as Kafka is read; then `verdict`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.seen: set[str] = set()
        self.delivered = 0
        self._last_seq: dict[str, int] = {}
        self._disordered: set[str] = set()
        self._phantoms: list[str] = []

    def see(self, event_id: str) -> bool:
        """Count one delivery; True when it is the event's first."""
        self.delivered += 1
        if event_id in self.seen:
            return False
        self.seen.add(event_id)
        entry = self.ledger.entries.get(event_id)
        if entry is None or not entry[2]:
            if event_id not in self.ledger.in_doubt:
                self._phantoms.append(event_id)
            return True
        key, seq, _ = entry
        # Per key, first deliveries come in increasing sequence (commit order); a redelivery
        # after a crash repeats older events, which is allowed (at least once).
        last = self._last_seq.get(key)
        if last is not None and seq <= last:
            self._disordered.add(key)
        self._last_seq[key] = seq
        return True

    def verdict(self) -> Verdict:
        committed = self.ledger.committed_ids
        lost = committed - self.seen
        return Verdict(
            committed=len(committed),
            rolled_back=self.ledger.rolled_back,
            in_doubt=len(self.ledger.in_doubt),
            delivered=self.delivered,
            lost=len(lost),
            phantom=len(self._phantoms),
            dup=self.delivered - len(self.seen),
            keys=len({key for key, _, ok in self.ledger.entries.values() if ok}),
            disordered_keys=sorted(self._disordered),
            lost_examples=sorted(lost)[:5],
            phantom_examples=self._phantoms[:5],
        )


@dataclass(frozen=True)
class Verdict:
    lost: int
    phantom: int
    dup: int
    disordered_keys: list[str]
    lost_examples: list[str]
    committed: int = 0
    rolled_back: int = 0
    in_doubt: int = 0
    delivered: int = 0
    keys: int = 0
    phantom_examples: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        """No loss, no phantom, per-key order kept (duplicates are allowed, and reported)."""
        return not self.reasons()

    def reasons(self) -> list[str]:
        """Why the guarantees did not hold, one line each (empty when they held)."""
        found = []
        if self.lost:
            found.append(f"{self.lost} committed event(s) never delivered, e.g. "
                         f"{', '.join(self.lost_examples)}")
        if self.phantom:
            found.append(f"{self.phantom} delivered event(s) never committed, e.g. "
                         f"{', '.join(self.phantom_examples)}")
        if self.disordered_keys:
            found.append(f"per-key order broken for {len(self.disordered_keys)} key(s), e.g. "
                         f"{', '.join(self.disordered_keys[:5])}")
        return found

    def assert_holds(self) -> None:
        reasons = self.reasons()
        assert not reasons, "; ".join(reasons)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "held": self.held}

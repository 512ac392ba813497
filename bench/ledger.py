"""The ledger check of RELIABILITY.md (lost, phantom, dup, per-key order) for a million events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Ledger:
    """What the writers did: ids of committed and of rolled-back events."""

    committed: set[bytes] = field(default_factory=set)
    rolled_back: set[bytes] = field(default_factory=set)

    def add(self, committed: Iterable[bytes], rolled_back: Iterable[bytes] = ()) -> None:
        self.committed.update(committed)
        self.rolled_back.update(rolled_back)


@dataclass(frozen=True)
class Verdict:
    committed: int
    rolled_back: int
    delivered: int
    lost: int
    phantom: int
    dup: int
    disordered_keys: int
    examples: list[str]

    @property
    def held(self) -> bool:
        """No loss, no phantom, per-key order kept (duplicates are allowed, and reported)."""
        return self.lost == 0 and self.phantom == 0 and self.disordered_keys == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "held": self.held}


class LedgerCheck:
    """Feed it every delivered message (`see`), then ask for the verdict.

    The verdict of tests/support/ledger.py, kept compact and streaming: ids are 16-byte strings
    and the per-key order check keeps only the last sequence number seen per key.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._seen: set[bytes] = set()
        self._last_seq: dict[str, int] = {}
        self._disordered: set[str] = set()
        self._phantoms: list[bytes] = []
        self.delivered = 0

    def see(self, event_id: bytes, key: str, seq: int) -> None:
        self.delivered += 1
        if event_id in self._seen:
            return
        self._seen.add(event_id)
        if event_id not in self.ledger.committed:
            self._phantoms.append(event_id)
            return
        # Per key, first deliveries must come in increasing sequence (commit order).
        last = self._last_seq.get(key)
        if last is not None and seq <= last:
            self._disordered.add(key)
        self._last_seq[key] = seq

    def verdict(self) -> Verdict:
        lost = self.ledger.committed - self._seen
        examples = [f"lost {i.hex()}" for i in sorted(lost)[:3]]
        examples += [f"phantom {i.hex()}" for i in self._phantoms[:3]]
        examples += [f"disordered key {k}" for k in sorted(self._disordered)[:3]]
        return Verdict(
            committed=len(self.ledger.committed),
            rolled_back=len(self.ledger.rolled_back),
            delivered=self.delivered,
            lost=len(lost),
            phantom=len(self._phantoms),
            dup=self.delivered - len(self._seen),
            disordered_keys=len(self._disordered),
            examples=examples,
        )

"""The ledger check of RELIABILITY.md: lost, phantom, dup and per-key order of a relay run."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field

from tests.support.kafka import Received


@dataclass
class Ledger:
    """What the writers did: event id -> (key, sequence number within the key, committed?)."""

    entries: dict[str, tuple[str, int, bool]] = field(default_factory=dict)

    def record(self, event_id: str, key: str, seq: int, committed: bool) -> None:
        self.entries[event_id] = (key, seq, committed)

    @property
    def committed_ids(self) -> set[str]:
        return {i for i, (_, _, ok) in self.entries.items() if ok}

    def check(self, delivered: list[Received]) -> Verdict:
        seen: dict[str, int] = defaultdict(int)
        first_sequences: dict[str, list[int]] = defaultdict(list)
        for message in delivered:
            event_id = message.id
            seen[event_id] += 1
            if seen[event_id] == 1 and event_id in self.entries:
                key, seq, _ = self.entries[event_id]
                first_sequences[key].append(seq)
        committed = self.committed_ids
        lost = committed - seen.keys()
        phantom = {i for i in seen if i not in committed}
        disordered = {
            key for key, seqs in first_sequences.items()
            if any(a >= b for a, b in itertools.pairwise(seqs))
        }
        return Verdict(
            lost=len(lost),
            phantom=len(phantom),
            dup=sum(seen.values()) - len(seen),
            disordered_keys=sorted(disordered),
            lost_examples=sorted(lost)[:5],
        )


@dataclass(frozen=True)
class Verdict:
    lost: int
    phantom: int
    dup: int
    disordered_keys: list[str]
    lost_examples: list[str]

    def assert_holds(self) -> None:
        assert self.lost == 0, f"{self.lost} committed events never delivered: {self.lost_examples}"
        assert self.phantom == 0, f"{self.phantom} delivered events were never committed"
        assert not self.disordered_keys, f"per-key order broken for {self.disordered_keys[:5]}"


def sequence_of(message: Received) -> int:
    return int(json.loads(message.value)["seq"])

"""The ledger check of RELIABILITY.md for tests: relay.verify.ledger, fed with read messages."""

from __future__ import annotations

import json

from relay.verify.ledger import Ledger as _Ledger
from relay.verify.ledger import Verdict
from tests.support.kafka import Received

__all__ = ["Ledger", "Verdict", "sequence_of"]


class Ledger(_Ledger):
    """What the writers did; `check` takes the messages a TopicReader read."""

    def check(self, delivered: list[Received]) -> Verdict:  # type: ignore[override]
        return super().check(message.id for message in delivered)


def sequence_of(message: Received) -> int:
    return int(json.loads(message.value)["seq"])

"""In-memory inbox stores (sync and asyncio), for unit tests of handlers and of the consumer's
decisions."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class TransientStoreError(Exception):
    """Raise it from a handler (or arm `fail_next`) to simulate a lost database connection."""


class RejectedCommitError(Exception):
    """Arm `reject_commit` to simulate a commit the database refuses (deferred constraint)."""


@dataclass
class MemorySession:
    """What handlers receive: collect effects with `add`; they land only if the commit does."""

    effects: list[Any] = field(default_factory=list)

    def add(self, effect: Any) -> None:
        self.effects.append(effect)


class MemoryTransaction:
    def __init__(self, store: MemoryInbox) -> None:
        self._store = store
        self._session = MemorySession()
        self._claimed: set[uuid.UUID] = set()
        self._numbers: dict[tuple[str, str], int] = {}
        self._open = True

    @property
    def handle(self) -> MemorySession:
        return self._session

    def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        self._store.claims += 1
        if self._store.fail_next.pop("claim", False):
            raise TransientStoreError("connection lost during claim")
        new = {i for i in ids if (self._store.consumer, i) not in self._store.rows}
        self._claimed |= new
        return set(new)

    def read_sequences(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        # The committed numbers of this consumer, and this transaction's own.
        consumer = self._store.consumer
        found = {(t, i): n for (c, t, i), n in self._store.sequences.items() if c == consumer}
        found.update(self._numbers)
        return {key: found[key] for key in keys if key in found}

    def save_sequences(self, numbers: Mapping[tuple[str, str], int]) -> None:
        # As the stores do: a number never goes back.
        committed = self.read_sequences(list(numbers))
        for key, number in numbers.items():
            self._numbers[key] = max(number, committed.get(key, 0))

    def commit(self) -> None:
        assert self._open, "transaction already finished"
        self._open = False
        if self._store.fail_next.pop("commit", False):
            raise TransientStoreError("connection lost during commit")
        if self._store.reject_commit is not None and self._store.reject_commit(
            self._session.effects
        ):
            raise RejectedCommitError("commit rejected")
        now = dt.datetime.now(dt.UTC)
        for event_id in self._claimed:
            self._store.rows[(self._store.consumer, event_id)] = now
        self._store.effects.extend(self._session.effects)
        for (aggregate_type, aggregate_id), number in self._numbers.items():
            key = (self._store.consumer, aggregate_type, aggregate_id)
            self._store.sequences[key] = max(number, self._store.sequences.get(key, 0))
        self._store.commits += 1

    def rollback(self) -> None:
        if self._open:
            self._open = False
            self._store.rollbacks += 1


class MemoryInbox:
    """An `InboxStore` in memory: dedup rows, committed effects and counters to assert on.

    `fail_next["claim"|"commit"] = True` makes the next such call fail transiently;
    `reject_commit(effects) -> bool` makes matching commits fail for good.
    """

    def __init__(self, consumer: str = "test") -> None:
        self.consumer = consumer
        self.rows: dict[tuple[str, uuid.UUID], dt.datetime] = {}
        # ordering="sequence": the last applied number per (consumer, aggregate_type,
        # aggregate_id).
        self.sequences: dict[tuple[str, str, str], int] = {}
        self.effects: list[Any] = []
        self.commits = 0
        self.rollbacks = 0
        self.claims = 0
        self.fail_next: dict[str, bool] = {}
        self.reject_commit: Any = None

    def check(self) -> None:
        """Always there."""

    def begin(self) -> MemoryTransaction:
        return MemoryTransaction(self)

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, TransientStoreError)

    def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        cutoff = dt.datetime.now(dt.UTC) - older_than
        old = [key for key, at in self.rows.items()
               if at < cutoff and (consumer is None or key[0] == consumer)]
        for key in old:
            del self.rows[key]
        return len(old)

    def close(self) -> None:
        """Nothing to release."""


class AsyncMemoryTransaction:
    """`MemoryTransaction` with the asyncio store's coroutines."""

    def __init__(self, tx: MemoryTransaction) -> None:
        self._tx = tx

    @property
    def handle(self) -> MemorySession:
        return self._tx.handle

    async def claim(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return self._tx.claim(ids)

    async def read_sequences(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return self._tx.read_sequences(keys)

    async def save_sequences(self, numbers: Mapping[tuple[str, str], int]) -> None:
        self._tx.save_sequences(numbers)

    async def commit(self) -> None:
        self._tx.commit()

    async def rollback(self) -> None:
        self._tx.rollback()


class AsyncMemoryInbox:
    """An `AsyncInboxStore` in memory for `AsyncConsumer(db=...)`: the same rows, effects,
    counters and failure switches as `MemoryInbox`, which it keeps in `inbox`."""

    def __init__(self, consumer: str = "test") -> None:
        self.inbox = MemoryInbox(consumer)

    async def check(self) -> None:
        """Always there."""

    async def begin(self) -> AsyncMemoryTransaction:
        return AsyncMemoryTransaction(self.inbox.begin())

    def is_transient(self, error: BaseException) -> bool:
        return self.inbox.is_transient(error)

    async def purge(self, older_than: dt.timedelta, consumer: str | None = None) -> int:
        return self.inbox.purge(older_than, consumer)

    async def close(self) -> None:
        """Nothing to release."""

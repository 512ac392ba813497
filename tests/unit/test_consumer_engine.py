"""The consumer's batch decisions, driven for real against the in-memory inbox (no services)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from outbox.consumer import Consumer, Message, RejectMessage, RetryPolicy
from outbox.consumer.engine import BatchEngine, BatchReport, Outcome
from outbox.consumer.message import Received, parse
from outbox.consumer.runner import SyncDriver
from outbox.consumer.testing import MemoryInbox, MemorySession, TransientStoreError

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
FAST = RetryPolicy(tries=3, base_delay=0.0, max_delay=0.0, jitter=0.0)


def record(n: int, event_id: uuid.UUID | None = None, event_type: str = "Created",
           partition: int = 0) -> Received:
    headers = [("id", str(event_id or uuid.UUID(int=n + 1)).encode()),
               ("event_type", event_type.encode())]
    return parse("Order", partition, n, str(n).encode(), b'{"n": %d}' % n, headers)


class Harness:
    def __init__(self, policy: RetryPolicy = FAST, **options: Any) -> None:
        self.store = MemoryInbox("billing")
        self.consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=self.store,
                                 retry=policy, **options)
        self.stop = threading.Event()
        self.calls: list[int] = []

    def run(self, items: list[Received], expired: frozenset[int] = frozenset()) -> BatchReport:
        return SyncDriver(self.store, self.consumer, self.stop).run(items, expired)

    def applied(self) -> list[int]:
        return [effect for effect in self.store.effects if isinstance(effect, int)]


def writes_n(harness: Harness, fail: dict[int, int] | None = None) -> None:
    """Registers a handler that records n; message n fails its first fail[n] calls."""
    remaining = dict(fail or {})

    @harness.consumer.handler("Created")
    def handle(session: MemorySession, message: Message) -> None:
        n = message.json()["n"]
        harness.calls.append(n)
        session.add(n)
        if remaining.get(n, 0) > 0:
            remaining[n] -= 1
            raise ValueError(f"handler failed on {n}")


def test_a_clean_batch_is_one_transaction_with_one_claim() -> None:
    h = Harness()
    writes_n(h)
    report = h.run([record(n) for n in range(5)])
    assert h.applied() == [0, 1, 2, 3, 4]
    assert (h.store.commits, h.store.claims) == (1, 1)
    assert report.count(Outcome.PROCESSED) == 5
    assert len(h.store.rows) == 5


def test_redelivered_messages_are_skipped_and_commit_nothing() -> None:
    h = Harness()
    writes_n(h)
    h.run([record(n) for n in range(3)])
    report = h.run([record(n) for n in range(3)])
    assert h.applied() == [0, 1, 2]
    assert report.count(Outcome.DUPLICATE) == 3
    assert h.store.commits == 1  # the second batch only rolled back


def test_the_same_id_twice_in_one_batch_applies_once() -> None:
    h = Harness()
    writes_n(h)
    same = uuid.uuid4()
    report = h.run([record(1, same), record(2, same)])
    assert h.applied() == [1]
    assert [report.outcomes[0], report.outcomes[1]] == [Outcome.PROCESSED, Outcome.DUPLICATE]


def test_failing_message_in_a_batch_neither_loses_nor_doubles_the_others() -> None:
    h = Harness(RetryPolicy(tries=2, base_delay=0, max_delay=0, jitter=0))
    writes_n(h, fail={2: 99})
    report = h.run([record(n) for n in range(5)])
    assert sorted(h.applied()) == [0, 1, 3, 4]
    assert report.outcomes[2] is Outcome.DEAD_LETTER
    [letter] = report.dead_letters
    assert letter.attempts == 2 and "handler failed on 2" in letter.reason
    assert report.retries == 1
    # The failed message has no dedup row: a replay of its dead letter will apply it.
    assert (h.store.consumer, uuid.UUID(int=3)) not in h.store.rows
    assert len(h.store.rows) == 4


def test_handler_that_recovers_on_a_retry_is_applied_once() -> None:
    h = Harness()
    writes_n(h, fail={1: 1})
    report = h.run([record(n) for n in range(3)])
    assert sorted(h.applied()) == [0, 1, 2]
    assert report.dead_letters == [] and report.retries == 1
    assert h.calls.count(1) == 2


def test_transient_store_errors_are_retried_without_spending_tries() -> None:
    h = Harness(RetryPolicy(tries=1, base_delay=0, max_delay=0, jitter=0))
    attempts = {"n": 0}

    @h.consumer.handler("Created")
    def flaky(session: MemorySession, message: Message) -> None:
        attempts["n"] += 1
        if attempts["n"] <= 3:
            raise TransientStoreError("server closed the connection")
        session.add(message.json()["n"])

    h.store.fail_next.update(claim=True, commit=True)
    report = h.run([record(7)])
    assert h.applied() == [7]
    assert report.dead_letters == []
    assert report.store_retries == 5


def test_commit_rejected_for_a_batch_falls_back_to_one_by_one() -> None:
    h = Harness()
    writes_n(h)
    h.store.reject_commit = lambda effects: 3 in effects
    report = h.run([record(n) for n in range(6)])
    assert sorted(h.applied()) == [0, 1, 2, 4, 5]
    assert report.outcomes[3] is Outcome.DEAD_LETTER
    assert "commit rejected" in report.dead_letters[0].reason


def test_unreadable_and_unhandled_messages_need_no_transaction() -> None:
    h = Harness()
    writes_n(h)
    poison = parse("Order", 0, 9, b"k", b"{}", [("event_type", b"Created")])
    other = record(1, event_type="Shipped")
    report = h.run([poison, other])
    assert report.outcomes == {0: Outcome.DEAD_LETTER, 1: Outcome.IGNORED}
    assert report.dead_letters[0].attempts == 0
    assert "no 'id' header" in report.dead_letters[0].reason
    assert h.store.claims == 0


def test_default_handler_takes_the_other_event_types() -> None:
    h = Harness()
    seen: list[str] = []
    h.consumer.default_handler(lambda session, message: seen.append(message.event_type))
    h.run([record(1, event_type="Shipped"), record(2, event_type="Paid")])
    assert seen == ["Shipped", "Paid"]


def test_reject_message_dead_letters_at_once() -> None:
    h = Harness(RetryPolicy(tries=5, base_delay=0, max_delay=0, jitter=0))

    @h.consumer.handler("Created")
    def refuse(session: MemorySession, message: Message) -> None:
        raise RejectMessage("order 1 is not ours")

    report = h.run([record(1)])
    assert report.dead_letters[0].attempts == 1 and report.retries == 0


def test_stop_during_backoff_leaves_the_message_unresolved() -> None:
    h = Harness(RetryPolicy(tries=3, base_delay=30, max_delay=30, jitter=0))
    writes_n(h, fail={1: 99})
    h.stop.set()
    report = h.run([record(0), record(1), record(2)])
    assert report.stopped
    assert report.outcomes == {0: Outcome.PROCESSED}
    assert h.applied() == [0]


def test_exhausted_retries_can_stop_instead_of_dead_lettering() -> None:
    h = Harness(RetryPolicy(tries=2, base_delay=0, max_delay=0, jitter=0, on_exhausted="stop"))
    writes_n(h, fail={1: 99})
    report = h.run([record(0), record(1), record(2)])
    assert report.exhausted is not None and report.exhausted.attempts == 2
    assert report.outcomes == {0: Outcome.PROCESSED}
    assert report.dead_letters == []


def test_engine_alone_is_a_plain_generator() -> None:
    items = [record(0), record(1)]
    steps = BatchEngine(items, FAST, lambda m: True, rand=lambda: 0.5).run()
    names = []
    reply: Any = None
    try:
        while True:
            step = steps.send(reply)
            names.append(type(step).__name__)
            reply = {m.message.id for m in items if m.message} if names[-1] == "Claim" else None
    except StopIteration as done:
        report = done.value
    assert names == ["Begin", "Claim", "Handle", "Handle", "Commit"]
    assert report.count(Outcome.PROCESSED) == 2


@pytest.mark.parametrize("batch", [1, 3, 10])
def test_every_message_is_resolved_exactly_once_whatever_fails(batch: int) -> None:
    h = Harness(RetryPolicy(tries=2, base_delay=0, max_delay=0, jitter=0))
    writes_n(h, fail={1: 1, 4: 99, 5: 1, 8: 99})
    items = [record(n) for n in range(10)]
    outcomes: dict[int, Outcome] = {}
    for start in range(0, len(items), batch):
        report = h.run(items[start : start + batch])
        outcomes.update({start + i: o for i, o in report.outcomes.items()})
    assert sorted(h.applied()) == [0, 1, 2, 3, 5, 6, 7, 9]
    assert {i for i, o in outcomes.items() if o is Outcome.DEAD_LETTER} == {4, 8}
    assert len(outcomes) == 10

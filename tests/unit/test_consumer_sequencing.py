"""ordering="sequence": the consumer's decisions on per-aggregate numbers, driven for real
against the in-memory inbox (no services), and the holds of the run loop."""

from __future__ import annotations

import uuid

import pytest

from outbox.consumer import Consumer, Message
from outbox.consumer.engine import Outcome
from outbox.consumer.message import Position, Received, parse
from outbox.consumer.sequencing import GapHolds, in_sequence_order
from outbox.consumer.testing import MemorySession
from outbox.errors import ConfigurationError
from tests.unit.test_consumer_engine import KAFKA, Harness

_offsets = iter(range(1_000_000))


def numbered(key: str, number: int | str | None, *, event_id: uuid.UUID | None = None,
             partition: int = 0) -> Received:
    """A message of aggregate Order/`key` with `sequence` header `number` (None: no header)."""
    headers = [("id", str(event_id or uuid.uuid4()).encode()), ("event_type", b"Changed"),
               ("aggregate_type", b"Order")]
    if number is not None:
        headers.append(("sequence", str(number).encode()))
    payload = b'{"key": "%s", "n": "%s"}' % (key.encode(), str(number).encode())
    return parse("Order", partition, next(_offsets), key.encode(), payload, headers)


def sequenced(fail: dict[str, int] | None = None) -> Harness:
    """A consumer with ordering="sequence" whose handler records "<key><n>"; message "<key><n>"
    fails its first fail["<key><n>"] calls."""
    h = Harness(ordering="sequence")
    remaining = dict(fail or {})

    @h.consumer.handler("Changed")
    def handle(session: MemorySession, message: Message) -> None:
        data = message.json()
        name = f"{data['key']}{data['n']}"
        if remaining.get(name, 0):
            remaining[name] -= 1
            raise ValueError(f"handler failed on {name}")
        session.add(name)

    return h


def applied(h: Harness) -> list[str]:
    return [effect for effect in h.store.effects if isinstance(effect, str)]


def test_the_next_number_is_applied_and_one_at_or_below_the_last_is_a_duplicate() -> None:
    h = sequenced()
    h.run([numbered("a", 1), numbered("a", 2), numbered("b", 1)])
    # A redelivery under a new id (the relay never does that, a replay might): still skipped.
    report = h.run([numbered("a", 2), numbered("a", 1), numbered("a", 3)])
    assert applied(h) == ["a1", "a2", "b1", "a3"]
    assert [report.outcomes[i] for i in range(3)] == [
        Outcome.DUPLICATE, Outcome.DUPLICATE, Outcome.PROCESSED]
    assert h.store.sequences == {("billing", "Order", "a"): 3, ("billing", "Order", "b"): 1}
    assert len(h.store.rows) == 4  # no dedup row for what was skipped by number


def test_a_batch_applies_each_aggregate_in_number_order() -> None:
    h = sequenced()
    report = h.run([numbered("a", 3), numbered("b", 1), numbered("a", 1), numbered("a", 2)])
    assert applied(h) == ["a1", "b1", "a2", "a3"]
    assert report.count(Outcome.PROCESSED) == 4


def test_a_gap_holds_its_aggregate_while_the_others_go_on() -> None:
    h = sequenced()
    report = h.run([numbered("a", 1), numbered("a", 3), numbered("b", 1), numbered("a", 4)])
    assert applied(h) == ["a1", "b1"]
    assert set(report.held) == {1, 3}
    assert "expected sequence 2, got 3" in report.held[1]
    assert set(report.outcomes) == {0, 2}  # the held ones stay unresolved
    assert h.store.sequences["billing", "Order", "a"] == 1


def test_held_messages_apply_once_the_missing_one_arrives() -> None:
    h = sequenced()
    first = [numbered("a", 1), numbered("a", 3)]
    report = h.run(first)
    missing = numbered("a", 2)
    report = h.run([first[1], missing])  # the run loop offers held messages first
    assert applied(h) == ["a1", "a2", "a3"]
    assert report.held == {} and report.count(Outcome.PROCESSED) == 2


def test_a_gap_whose_wait_is_over_is_dead_lettered_with_reason_gap() -> None:
    h = sequenced()
    report = h.run([numbered("a", 2), numbered("b", 1)], expired=frozenset({0}))
    assert applied(h) == ["b1"]
    assert report.outcomes[0] is Outcome.DEAD_LETTER
    assert report.dead_letters[0].reason.startswith("gap: Order a expected sequence 1, got 2")
    assert report.sequence_gaps == 1
    assert ("billing", "Order", "a") not in h.store.sequences


def test_unnumbered_messages_apply_as_without_ordering_and_bad_numbers_dead_letter() -> None:
    h = sequenced()
    report = h.run([numbered("a", None), numbered("a", "x"), numbered("a", 0), numbered("a", 1)])
    assert applied(h) == ["aNone", "a1"]
    assert [r.reason for r in report.dead_letters] == [
        "the 'sequence' header 'x' is not a positive integer",
        "the 'sequence' header '0' is not a positive integer",
    ]


def test_a_numbered_message_without_a_handler_is_ignored_but_counts() -> None:
    h = sequenced()
    unhandled = numbered("a", 2)
    other = parse("Order", 0, next(_offsets), b"a", b"{}", [
        *unhandled.raw_headers[:1], ("event_type", b"Noted"), *unhandled.raw_headers[2:]])
    report = h.run([numbered("a", 1), other, numbered("a", 3)])
    assert applied(h) == ["a1", "a3"]
    assert report.outcomes[1] is Outcome.IGNORED and report.held == {}
    assert h.store.sequences["billing", "Order", "a"] == 3
    assert len(h.store.rows) == 2  # no dedup row for what no handler took


def test_a_failing_handler_is_retried_and_the_numbers_after_it_still_apply() -> None:
    h = sequenced(fail={"a2": 1})
    report = h.run([numbered("a", 1), numbered("a", 2), numbered("a", 3)])
    assert applied(h) == ["a1", "a2", "a3"]
    assert report.retries == 1 and report.held == {}
    assert h.store.sequences["billing", "Order", "a"] == 3


def test_without_ordering_the_sequence_header_is_not_checked() -> None:
    h = Harness()

    @h.consumer.handler("Changed")
    def handle(session: MemorySession, message: Message) -> None:
        session.add(message.headers["sequence"])

    report = h.run([numbered("a", 5), numbered("a", 2)])
    assert h.store.effects == ["5", "2"] and report.held == {}


def test_in_sequence_order_permutes_only_within_an_aggregate() -> None:
    key_a, key_b = ("Order", "a"), ("Order", "b")
    numbers = {0: (key_a, 3), 1: (key_b, 2), 3: (key_a, 1), 4: (key_b, 1)}
    assert in_sequence_order([0, 1, 2, 3, 4], numbers) == [3, 4, 2, 0, 1]


def _item(offset: int, partition: int = 0) -> Received:
    return Received(Position("t", partition, offset), None, None, [], None)


def test_gap_holds_offer_held_messages_first_until_their_wait_ends() -> None:
    holds = GapHolds(timeout=10.0)
    first = [_item(0), _item(1)]
    assert holds.settle(first, [1], now=100.0) == [1]
    assert len(holds) == 1
    assert holds.next_batch([], now=105.0).items == []  # nothing new, nothing expired
    assert holds.wait(30.0, now=105.0) == 5.0
    later = holds.next_batch([_item(2)], now=105.0)
    assert [i.position.offset for i in later.items] == [1, 2] and later.expired == frozenset()
    # Held again: keeps its deadline; only offset 2 is new.
    assert holds.settle(later.items, [0, 1], now=105.0) == [1]
    due = holds.next_batch([], now=110.0)
    assert [i.position.offset for i in due.items] == [1, 2] and due.expired == {0}
    holds.forget([("t", 1)])  # partition 0 was revoked
    assert len(holds) == 0


@pytest.mark.parametrize("options, match", [
    ({"ordering": "strict"}, "ordering='strict'"),
    ({"ordering": "sequence", "gap_timeout": 0}, "gap_timeout=0"),
    ({"gap_timeout": float("nan")}, "gap_timeout=nan"),
])
def test_bad_ordering_options_fail_at_start_up(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Consumer(name="c", kafka=KAFKA, topics=["t"], db="postgresql://x/y",
                 **options)  # type: ignore[arg-type]

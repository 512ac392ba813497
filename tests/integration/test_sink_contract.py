"""The sink contract (relay/core/ports.py `Sink`), for every sink: the Kafka sink against the real
broker, and the in-memory sink the core's unit tests rely on (so that its answers mean what
Kafka's mean). A new sink (NATS JetStream, ...) joins the parametrisation.

What a sink promises the core: each event's outcome comes back once, with its token; a refusal
for good is `permanent` and holds the event's key, so the key's later events are refused too
("held behind <id>") while other keys flow; `flush` answers everything; `purge` answers what it
drops as failed (never as delivered); `send` waits through `on_wait`, which may end the wait.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from outbox.record import OutboxRecord
from relay.core.ports import Delivery, Sink
from relay.core.testing import MemorySink
from relay.sinks.kafka.sink import KafkaSink, PublisherConfig
from tests.support.kafka import TopicReader, create_topics, unique_topic


@dataclass
class Answers:
    """What the sink reported, by token."""

    deliveries: dict[int, Delivery] = field(default_factory=dict)

    def on_delivery(self, token: int, delivery: Delivery) -> None:
        assert token not in self.deliveries, f"token {token} answered twice"
        self.deliveries[token] = delivery

    def outcome(self, token: int) -> str:
        delivery = self.deliveries[token]
        return "delivered" if delivery.ok else "parked" if delivery.permanent else "failed"


@dataclass
class Wiring:
    make: Callable[[Answers], Sink[int]]
    topic: str
    # Reads the topic back (None: the sink keeps what it delivered itself).
    delivered_keys: Callable[[int], list[str]]
    # The sink knows a size limit of its own (the topic's max.message.bytes).
    refuses_by_size: bool


def _kafka(bootstrap: str) -> Wiring:
    topic = unique_topic("sink")
    create_topics(bootstrap, topic, config={"max.message.bytes": "10000"})
    config = PublisherConfig(bootstrap_servers=bootstrap, topic_template=topic)

    def delivered_keys(count: int) -> list[str]:
        reader = TopicReader(bootstrap, topic)
        try:
            return [m.key or "" for m in reader.read_until(lambda got: len(got) >= count)]
        finally:
            reader.close()

    return Wiring(lambda answers: KafkaSink[int](config, answers.on_delivery), topic,
                  delivered_keys, refuses_by_size=True)


def _memory() -> Wiring:
    topic = unique_topic("sink")
    made: list[MemorySink[int]] = []

    def make(answers: Answers) -> Sink[int]:
        made.append(MemorySink[int](answers.on_delivery, topic_template=topic))
        return made[-1]

    return Wiring(make, topic, lambda _count: [r.aggregate_id for r in made[-1].delivered],
                  refuses_by_size=False)


@pytest.fixture(params=["kafka", "memory"])
def wiring(request: pytest.FixtureRequest) -> Iterator[Wiring]:
    if request.param == "kafka":
        yield _kafka(request.getfixturevalue("kafka_bootstrap"))
    else:
        yield _memory()


def record(key: str, payload: bytes = b'{"n": 1}', aggregate_type: str = "orders") -> OutboxRecord:
    return OutboxRecord(uuid.uuid4(), aggregate_type, key, "Happened", payload,
                        "application/json")


def answered(sink: Sink[int], answers: Answers, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(answers.deliveries) < count:
        assert time.monotonic() < deadline, f"{len(answers.deliveries)} of {count} answered"
        sink.poll(0.1)


def test_every_event_is_answered_once_with_its_token(wiring: Wiring) -> None:
    answers = Answers()
    sink = wiring.make(answers)
    records = [record(f"k{n % 3}") for n in range(30)]
    for token, rec in enumerate(records):
        sink.send(rec, token)
    assert sink.flush(30.0) == 0
    answered(sink, answers, 30)
    assert all(answers.outcome(t) == "delivered" for t in range(30))
    assert all(answers.deliveries[t].record is records[t] for t in range(30))
    assert {answers.deliveries[t].topic for t in range(30)} == {wiring.topic}
    assert sink.in_flight == 0
    keys = wiring.delivered_keys(30)
    for key in ("k0", "k1", "k2"):  # per-key order is the order of `send`
        assert [k for k in keys if k == key] == [r.aggregate_id for r in records
                                                 if r.aggregate_id == key]


def test_a_topic_name_the_sink_refuses_is_permanent_and_holds_the_key(wiring: Wiring) -> None:
    answers = Answers()
    sink = wiring.make(answers)
    bad = OutboxRecord(uuid.uuid4(), "orders", "a", "E", b"{}", "application/json",
                       topic="no spaces allowed")
    sink.send(bad, 0)
    sink.send(record("a"), 1)  # same key, after the refused one
    sink.send(record("b"), 2)  # another key flows
    sink.flush(30.0)
    answered(sink, answers, 3)
    assert [answers.outcome(t) for t in range(3)] == ["parked", "parked", "delivered"]
    assert "invalid topic name" in (answers.deliveries[0].error or "")
    assert answers.deliveries[1].error == f"held behind {bad.id}"
    assert ("orders", "a") in sink.holds


def test_an_event_above_the_size_limit_is_refused_for_good(wiring: Wiring) -> None:
    if not wiring.refuses_by_size:
        pytest.skip("this sink has no size limit of its own")
    answers = Answers()
    sink = wiring.make(answers)
    # Incompressible (the producer compresses): far above the topic's 10,000 bytes either way.
    sink.send(record("big", payload=f'"{secrets.token_hex(30_000)}"'.encode()), 0)
    sink.send(record("small"), 1)
    sink.flush(30.0)
    answered(sink, answers, 2)
    assert [answers.outcome(0), answers.outcome(1)] == ["parked", "delivered"]
    assert ("orders", "big") in sink.holds


def test_the_returning_event_a_key_waits_behind_ends_the_hold(wiring: Wiring) -> None:
    answers = Answers()
    sink = wiring.make(answers)
    first = record("a")
    sink.holds.hold(("orders", "a"), first.id)  # read from the parked events at start-up
    sink.send(record("a"), 0)
    sink.send(first, 1)  # re-queued by `outbox parked retry`
    sink.send(record("a"), 2)
    sink.flush(30.0)
    answered(sink, answers, 3)
    assert [answers.outcome(t) for t in range(3)] == ["parked", "delivered", "delivered"]
    assert ("orders", "a") not in sink.holds


def test_the_broker_is_reachable(wiring: Wiring) -> None:
    assert wiring.make(Answers()).broker_reachable(timeout=10.0) is True


def test_purge_answers_nothing_as_delivered(wiring: Wiring) -> None:
    answers = Answers()
    sink = wiring.make(answers)
    for token in range(20):
        sink.send(record("p"), token)
    sink.purge()
    sink.flush(30.0)
    answered(sink, answers, 20)
    outcomes = {answers.outcome(t) for t in range(20)}
    # What was purged is failed (sent again by the next run); what left before is delivered.
    assert outcomes <= {"delivered", "failed"}
    assert sink.in_flight == 0

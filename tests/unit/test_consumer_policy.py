"""Retry policy, offset tracking and configuration of the consumer (no services)."""

from __future__ import annotations

import datetime as dt

import pytest

from outbox.consumer import Consumer, RejectMessage, RetryPolicy
from outbox.consumer.message import Position
from outbox.consumer.offsets import OffsetTracker
from outbox.consumer.policy import Verdict, describe
from outbox.consumer.settings import consumer_settings, producer_settings
from outbox.consumer.testing import MemoryInbox
from outbox.consumer_cli import parse_duration
from outbox.errors import ConfigurationError

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(tries=10, base_delay=0.5, max_delay=4.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_within_its_fraction_and_the_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=1.05, jitter=0.1)
    assert policy.delay(1, rand=0.0) == pytest.approx(0.9)
    assert policy.delay(1, rand=0.999) == pytest.approx(1.05)


def test_decisions_retry_then_dead_letter_or_stop() -> None:
    policy = RetryPolicy(tries=3, jitter=0.0)
    error = ValueError("boom")
    assert policy.decide(1, error).verdict is Verdict.RETRY
    assert policy.decide(2, error).verdict is Verdict.RETRY
    assert policy.decide(3, error).verdict is Verdict.DEAD_LETTER
    stopping = RetryPolicy(tries=2, on_exhausted="stop")
    assert stopping.decide(2, error).verdict is Verdict.STOP


def test_rejected_message_is_dead_lettered_without_retries() -> None:
    assert RetryPolicy(tries=5).decide(1, RejectMessage("bad order")).verdict is Verdict.DEAD_LETTER


def test_error_text_is_bounded() -> None:
    text = describe(ValueError("x" * 10_000))
    assert text.startswith("ValueError: xxx") and len(text) <= 2000


@pytest.mark.parametrize(
    "kwargs",
    [{"tries": 0}, {"base_delay": -1}, {"base_delay": 5, "max_delay": 1}, {"multiplier": 0.5},
     {"jitter": 1.0}, {"on_exhausted": "explode"}],
)
def test_invalid_retry_policy_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_offsets_commit_only_past_resolved_messages() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.fetched(Position("t", 0, offset))
    tracker.resolved(Position("t", 0, 10))
    tracker.resolved(Position("t", 0, 12))
    # 11 is still open (e.g. its dead letter awaits Kafka): commit up to it, not past it.
    assert tracker.committable() == {("t", 0): 11}
    tracker.committed({("t", 0): 11})
    assert tracker.committable() == {}
    tracker.resolved(Position("t", 0, 11))
    assert tracker.committable() == {("t", 0): 13}


def test_offsets_skip_gaps_and_forget_revoked_partitions() -> None:
    tracker = OffsetTracker()
    tracker.fetched(Position("t", 1, 5))
    tracker.fetched(Position("t", 1, 8))  # 6, 7: transaction markers, never delivered
    tracker.resolved(Position("t", 1, 5))
    assert tracker.committable() == {("t", 1): 6}
    tracker.resolved(Position("t", 1, 8))
    tracker.fetched(Position("t", 2, 0))
    assert tracker.committable() == {("t", 1): 9}
    assert tracker.committable([("t", 2)]) == {}
    tracker.forget([("t", 1)])
    assert tracker.committable() == {}


def test_message_resolved_after_its_partition_was_revoked_commits_nothing() -> None:
    tracker = OffsetTracker()
    tracker.fetched(Position("t", 0, 3))
    tracker.forget([("t", 0)])
    tracker.resolved(Position("t", 0, 3))
    assert tracker.committable() == {}


def test_consumer_settings_refuse_unsafe_and_auto_commit() -> None:
    with pytest.raises(ConfigurationError, match="plugin.library.paths"):
        consumer_settings("g", {**KAFKA, "plugin.library.paths": "/tmp/x.so"})
    with pytest.raises(ConfigurationError, match="enable.auto.commit"):
        consumer_settings("g", {**KAFKA, "enable.auto.commit": True})
    with pytest.raises(ConfigurationError, match="bootstrap.servers"):
        consumer_settings("g", {})
    allowed = consumer_settings("g", {**KAFKA, "plugin.library.paths": "x"}, allow_unsafe=True)
    assert allowed["plugin.library.paths"] == "x"
    settings = consumer_settings("billing", {**KAFKA, "enable.auto.commit": "false"})
    assert settings["group.id"] == "billing"
    assert settings["enable.auto.commit"] == "false"
    assert settings["auto.offset.reset"] == "earliest"


def test_dead_letter_producer_gets_connection_settings_but_not_consumer_ones() -> None:
    settings = consumer_settings(
        "g", {**KAFKA, "security.protocol": "SASL_SSL", "session.timeout.ms": 10000,
              "fetch.min.bytes": 1}
    )
    producer = producer_settings(settings)
    assert producer["security.protocol"] == "SASL_SSL"
    assert producer["bootstrap.servers"] == "127.0.0.1:9"
    assert producer["enable.idempotence"] == "true"
    assert not {"group.id", "session.timeout.ms", "fetch.min.bytes", "enable.auto.commit"} & set(
        producer)


def make(**options: object) -> Consumer:
    return Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=MemoryInbox(),
                    **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"topics": "Order"}, "list of topic names"),
        ({"topics": []}, "topics is empty"),
        ({"topics": ["bad topic"]}, "not a valid Kafka topic"),
        ({"batch_size": 0}, "batch_size"),
        ({"dead_letter_topic": "{topic}"}, "back to"),
        ({"inbox_table": "x;drop"}, "inbox_table"),
        ({"purge_older_than": dt.timedelta(0)}, "purge_older_than"),
        ({"name": ""}, "name="),
        ({"retry": RetryPolicy(tries=20, max_delay=60)}, "max.poll.interval.ms"),
    ],
)
def test_invalid_consumer_configuration_fails_at_construction(
    options: dict[str, object], match: str
) -> None:
    base: dict[str, object] = {"name": "billing", "kafka": KAFKA, "topics": ["Order"],
                               "db": MemoryInbox()}
    with pytest.raises(ConfigurationError, match=match):
        Consumer(**{**base, **options})  # type: ignore[arg-type]


def test_consumer_needs_exactly_one_database() -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        Consumer(name="b", kafka=KAFKA, topics=["Order"])
    with pytest.raises(ConfigurationError, match="exactly one"):
        Consumer(name="b", kafka=KAFKA, topics=["Order"], db="postgresql://x", mongo=object())


def test_handler_registration_rules() -> None:
    consumer = make()

    @consumer.handler("OrderCreated", "OrderUpdated")
    def on_order(session: object, message: object) -> None: ...

    with pytest.raises(ConfigurationError, match="already registered"):
        consumer.handler("OrderUpdated")(on_order)
    with pytest.raises(ConfigurationError, match="at least one event type"):
        consumer.handler()

    async def coroutine(session: object, message: object) -> None: ...

    with pytest.raises(ConfigurationError, match="AsyncConsumer"):
        consumer.handler("Other")(coroutine)  # type: ignore[arg-type]
    consumer.default_handler(on_order)
    with pytest.raises(ConfigurationError, match="default handler is already"):
        consumer.default_handler(on_order)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("12h", 43200), ("1d12h", 129600), ("30m", 1800), ("90s", 90),
     ("2w", 1209600)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7x", "d7", "0d", "-1d", "7d junk"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="duration"):
        parse_duration(text)

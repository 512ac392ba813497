"""The rules behind per-key parking, topic size limits and the WAL cleanup's transaction ids,
without Kafka or PostgreSQL (relay.core.holds, relay.sinks.kafka.topic_limits, relay.published);
the integration tests run them against the real services."""

from __future__ import annotations

import uuid

from outbox.record import OutboxRecord
from relay.core.holds import KeyHolds
from relay.sinks.kafka.topic_limits import HEADROOM_BYTES, KNOWN_TTL, UNKNOWN_TTL, TopicLimits


def record(key: str, aggregate_type: str = "orders") -> OutboxRecord:
    return OutboxRecord(uuid.uuid4(), aggregate_type, key, "E", b"{}", "application/json")


def test_a_parked_event_holds_its_key_only() -> None:
    holds = KeyHolds()
    first, later, other_key, other_type = record("K"), record("K"), record("L"), record("K", "x")
    holds.parked(first)
    assert holds.reason_to_park(later) == f"held behind {first.id}"
    assert holds.reason_to_park(other_key) is None
    assert holds.reason_to_park(other_type) is None


def test_the_key_waits_behind_its_first_parked_event_until_that_one_comes_back() -> None:
    first, second, new = record("K"), record("K"), record("K")
    holds = KeyHolds([(("orders", "K"), first.id), (("orders", "K"), second.id)])
    holds.parked(second)  # parked again (held): the key still waits behind the first
    assert holds.reason_to_park(second) == f"held behind {first.id}"
    assert holds.reason_to_park(first) is None  # re-queued: it goes, and the hold ends
    assert holds.reason_to_park(second) is None
    assert holds.reason_to_park(new) is None
    assert len(holds) == 0


def limits(described: dict[str, int | None], batch: int = 1_000_000) -> TopicLimits:
    return TopicLimits(lambda topic: described[topic], batch)


def test_a_topic_taking_a_full_batch_sends_only_events_near_its_limit_alone() -> None:
    limit = limits({"t": 1_048_588}).of("t", now=0)
    assert limit.budget is None
    assert limit.alone_from == 1_000_000 - HEADROOM_BYTES


def test_a_topic_below_the_batch_size_bounds_its_bytes_in_flight() -> None:
    limit = limits({"t": 100_000}).of("t", now=0)
    assert limit.budget == limit.alone_from == 100_000 - HEADROOM_BYTES


def test_an_unknown_limit_is_read_again_sooner_than_a_known_one() -> None:
    described: dict[str, int | None] = {"t": None, "u": 200_000}
    topics = limits(described)
    assert topics.of("t", now=0).budget is None
    described["t"] = 100_000
    assert topics.of("t", now=UNKNOWN_TTL - 1).budget is None
    assert topics.of("t", now=UNKNOWN_TTL).budget == 100_000 - HEADROOM_BYTES
    assert topics.of("u", now=0).budget == 200_000 - HEADROOM_BYTES
    described["u"] = 2_000_000
    assert topics.of("u", now=KNOWN_TTL - 1).budget == 200_000 - HEADROOM_BYTES
    assert topics.of("u", now=KNOWN_TTL).budget is None


def test_a_batch_refused_for_its_size_makes_every_event_of_the_topic_go_alone() -> None:
    topics = limits({"t": None})
    topics.refused_in_batch("t")
    assert topics.of("t", now=0).alone_from == 0
    assert topics.of("t", now=KNOWN_TTL * 10).alone_from == 0  # for good, in this relay


def test_pgoutput_xids_widen_to_the_tables_xid8_across_a_wraparound() -> None:
    from relay.published import full_txids

    epoch = 3 << 32
    assert full_txids([1000, 999], epoch + 5000) == [str(epoch + 1000), str(epoch + 999)]
    # Assigned just before the counter wrapped into this epoch: the epoch before.
    assert full_txids([4_294_967_000], epoch + 10) == [str(epoch - (1 << 32) + 4_294_967_000)]

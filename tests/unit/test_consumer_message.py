"""Reading Kafka records into consumer messages, and the dead-letter headers (no services)."""

from __future__ import annotations

import json
import uuid

import pytest

from outbox.consumer import dead_letters
from outbox.consumer.message import parse

EVENT_ID = uuid.UUID("0190c2f0-0000-7000-8000-000000000001")


def headers(**overrides: bytes | None) -> list[tuple[str, bytes | None]]:
    base: dict[str, bytes | None] = {
        "id": str(EVENT_ID).encode(),
        "event_type": b"OrderCreated",
        "aggregate_type": b"Order",
        "content_type": b"application/json",
        "tenant": b"eu",
    }
    base.update(overrides)
    return [(k, v) for k, v in base.items() if v is not None]


def test_relay_record_becomes_a_message_with_its_own_headers_only() -> None:
    got = parse("Order", 2, 41, b"42", b'{"orderId": 42}', headers(), 1700000000000)
    assert got.problem is None and got.message is not None
    message = got.message
    assert message.id == EVENT_ID
    assert (message.event_type, message.aggregate_type, message.aggregate_id) == (
        "OrderCreated", "Order", "42")
    assert (message.topic, message.partition, message.offset) == ("Order", 2, 41)
    assert message.headers == {"tenant": "eu"}
    assert message.json() == {"orderId": 42}
    assert message.timestamp_ms == 1700000000000


@pytest.mark.parametrize(
    ("raw_headers", "value", "reason"),
    [
        (headers(id=None), b"{}", "no 'id' header"),
        (headers(id=b"not-a-uuid"), b"{}", "is not a UUID"),
        (headers(id=b"\xff\xfe"), b"{}", "not UTF-8"),
        (headers(event_type=None), b"{}", "no 'event_type' header"),
        (headers(), None, "tombstone"),
        (headers(), b"{not json", "not valid JSON"),
    ],
)
def test_unreadable_record_is_a_problem_not_an_exception(
    raw_headers: list[tuple[str, bytes | None]], value: bytes | None, reason: str
) -> None:
    got = parse("Order", 0, 7, b"1", value, raw_headers)
    assert got.message is None
    assert got.problem is not None and reason in got.problem
    assert got.raw_headers == raw_headers and got.value == value


def test_non_json_payload_is_not_validated() -> None:
    got = parse("Doc", 0, 0, b"d", b"<doc/>", headers(content_type=b"application/xml"))
    assert got.message is not None and got.message.payload == b"<doc/>"


def test_json_validation_can_be_switched_off() -> None:
    got = parse("Order", 0, 0, b"1", b"{oops", headers(), validate_json=False)
    assert got.message is not None


def test_message_is_frozen() -> None:
    message = parse("Order", 0, 0, b"1", b"{}", headers()).message
    assert message is not None
    with pytest.raises(AttributeError):
        message.offset = 3  # type: ignore[misc]


def test_dead_letter_headers_round_trip_to_the_original_headers() -> None:
    received = parse("Order", 3, 99, b"1", b"{}", headers())
    out = dead_letters.headers_for(received, "billing", "ValueError: boom", 5)
    found = dict(out)
    assert found[dead_letters.ORIGINAL_TOPIC] == b"Order"
    assert found[dead_letters.ORIGINAL_PARTITION] == b"3"
    assert found[dead_letters.ORIGINAL_OFFSET] == b"99"
    assert found[dead_letters.CONSUMER] == b"billing"
    assert found[dead_letters.ERROR] == b"ValueError: boom"
    assert found[dead_letters.ATTEMPTS] == b"5"
    topic, restored = dead_letters.original(out)
    assert topic == "Order"
    assert restored == headers()


def test_dead_lettering_a_replayed_message_again_keeps_one_set_of_dlq_headers() -> None:
    first = dead_letters.headers_for(parse("Order", 0, 1, b"1", b"{}", headers()), "c", "e", 1)
    again = dead_letters.headers_for(parse("Order", 0, 9, b"1", b"{}", first), "c", "e2", 1)
    assert [name for name, _ in again].count(dead_letters.ORIGINAL_OFFSET) == 1
    assert dict(again)[dead_letters.ORIGINAL_OFFSET] == b"9"


@pytest.mark.parametrize("template", ["{topic}.dlq", "dlq.{topic}", "dead-letters"])
def test_dead_letter_topic_templates(template: str) -> None:
    dead_letters.check_template(template)
    assert dead_letters.topic_for(template, "Order") == template.format(topic="Order")


@pytest.mark.parametrize("template", ["{aggregate_type}.dlq", "{topic", "bad topic {topic}"])
def test_bad_dead_letter_templates_are_refused(template: str) -> None:
    from outbox.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="dead_letter_topic"):
        dead_letters.check_template(template)


def test_payload_bytes_are_kept_exactly() -> None:
    payload = json.dumps({"name": "Zoë"}, ensure_ascii=False).encode()
    message = parse("Order", 0, 0, b"1", payload, headers()).message
    assert message is not None and message.payload == payload

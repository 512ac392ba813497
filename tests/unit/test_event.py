"""The event model, ids, the stored-record encoding: pure logic, no services."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

import outbox
from outbox.ids import uuid7
from outbox.record import OutboxRecord, decode_message


def test_ids_are_version_7_and_sort_in_creation_order() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_event_gets_an_id_and_a_timezone_aware_creation_time() -> None:
    event = outbox.Event("Order", "1", "OrderCreated", {"a": 1})
    assert event.id.version == 7
    assert event.created_at.tzinfo is not None
    assert event.resolved_content_type == "application/json"
    assert event.encode_payload() == b'{"a":1}'


@pytest.mark.parametrize("field", ["aggregate_type", "aggregate_id", "event_type"])
def test_empty_identity_fields_are_refused(field: str) -> None:
    values = {"aggregate_type": "Order", "aggregate_id": "1", "event_type": "Created", field: " "}
    with pytest.raises(outbox.InvalidEventError, match=field):
        outbox.Event(**values)


def test_events_are_immutable() -> None:
    event = outbox.Event("Order", "1", "OrderCreated")
    with pytest.raises(AttributeError):
        event.event_type = "Other"  # type: ignore[misc]


def test_non_string_headers_and_naive_times_are_refused() -> None:
    with pytest.raises(outbox.InvalidEventError, match="headers"):
        outbox.Event("Order", "1", "E", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(outbox.InvalidEventError, match="timezone"):
        outbox.Event("Order", "1", "E", created_at=dt.datetime(2026, 1, 1))


def test_content_type_other_than_json_needs_bytes() -> None:
    with pytest.raises(outbox.InvalidEventError, match="bytes payload"):
        outbox.Event("Order", "1", "E", {"a": 1}, content_type="application/avro")
    event = outbox.Event("Order", "1", "E", bytearray(b"\x00\x01"), content_type="application/avro")
    assert event.payload == b"\x00\x01"


def test_unserialisable_and_nan_payloads_fail_when_encoded() -> None:
    with pytest.raises(outbox.InvalidEventError, match="not serialisable"):
        outbox.Event("Order", "1", "E", {"when": object()}).encode_payload()
    with pytest.raises(outbox.InvalidEventError, match="not serialisable"):
        outbox.Event("Order", "1", "E", {"x": float("nan")}).encode_payload()


def test_message_encoding_round_trips() -> None:
    record = OutboxRecord(
        id=uuid.uuid4(), aggregate_type="Order", aggregate_id="42", event_type="OrderCreated",
        payload=b"\x00binary\xff", content_type="application/octet-stream",
        headers={"tenant": "eu", "ünï": "cödé"}, topic="orders.v1",
        created_at=dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC),
    )
    assert decode_message(record.encode_message()) == record


def test_foreign_message_content_is_refused_clearly() -> None:
    with pytest.raises(outbox.InvalidEventError, match="version 9"):
        decode_message(b"\x09\x00\x00\x00\x02{}")
    with pytest.raises(outbox.InvalidEventError, match="too short"):
        decode_message(b"\x01")
    with pytest.raises(outbox.InvalidEventError, match="malformed"):
        decode_message(b"\x01\x00\x00\x00\x02{}")


def test_records_are_checked_before_any_sql() -> None:
    small = outbox.Outbox(max_payload_bytes=10)
    with pytest.raises(outbox.PayloadTooLargeError, match="maximum is 10"):
        small.records([outbox.Event("Order", "1", "E", {"text": "more than ten bytes"})])
    with pytest.raises(outbox.InvalidEventError, match="expected outbox.Event"):
        small.records(["not an event"])  # type: ignore[list-item]


def test_unsupported_target_is_named() -> None:
    with pytest.raises(outbox.UnsupportedTargetError, match="dict"):
        outbox.publish({}, outbox.Event("Order", "1", "E"))  # type: ignore[call-overload]


def _message(**header: object) -> bytes:
    import json
    import struct

    base = {"id": str(uuid.uuid4()), "aggregate_type": "Order", "aggregate_id": "1",
            "event_type": "E", "content_type": "application/json", "headers": {},
            "topic": None, "created_at": None}
    encoded = json.dumps({**base, **header}).encode()
    return struct.pack(">BI", 1, len(encoded)) + encoded + b"{}"


@pytest.mark.parametrize(
    "header",
    [{"aggregate_type": 5}, {"aggregate_id": ""}, {"event_type": None},
     {"headers": {"n": 1}}, {"headers": ["x"]}, {"topic": 7}, {"id": "not-a-uuid"},
     {"created_at": "yesterday"}],
)
def test_message_headers_of_the_wrong_type_are_refused(header: dict[str, object]) -> None:
    with pytest.raises(outbox.InvalidEventError, match="malformed"):
        decode_message(_message(**header))


def test_message_ids_in_other_spellings_still_read() -> None:
    event_id = uuid.uuid4()
    assert decode_message(_message(id=event_id.hex)).id == event_id
    assert decode_message(_message(id=str(event_id).upper())).id == event_id


def test_fast_uuid_construction_equals_the_constructor() -> None:
    from outbox.ids import uuid_from_int, uuid_from_text

    for value in (0, 1, uuid.uuid4().int, (1 << 128) - 1):
        made, expected = uuid_from_int(value), uuid.UUID(int=value)
        assert (made, str(made), hash(made), made.version, made.bytes) == (
            expected, str(expected), hash(expected), expected.version, expected.bytes)
        assert uuid_from_text(str(expected)) == expected
    for bad in (-1, 1 << 128):
        with pytest.raises(ValueError):
            uuid_from_int(bad)
    with pytest.raises(ValueError):
        uuid_from_text("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz")

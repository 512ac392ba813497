"""The MongoDB write side without a server: entries, merged updates, and errors before writing."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from typing import Any

import pytest
from bson import Binary, ObjectId
from pymongo import MongoClient

import outbox
from outbox import mongo as outbox_mongo
from outbox.errors import (
    AtomicityError,
    ConfigurationError,
    InvalidEventError,
    UnsupportedTargetError,
)


def event(seq: int = 1, **options: Any) -> outbox.Event:
    return outbox.Event("Order", "42", "OrderChanged", {"seq": seq}, **options)


def test_with_events_merges_a_push_of_each_entry_into_the_update() -> None:
    first, second = event(1, headers={"tenant": "eu"}), event(2)
    update = {"$set": {"state": "APPROVED"}, "$push": {"history": "approved"}}
    original = copy.deepcopy(update)

    merged = outbox_mongo.with_events(update, first, second)

    assert update == original, "the caller's update must not be modified"
    assert merged["$set"] == {"state": "APPROVED"}
    assert merged["$push"]["history"] == "approved"
    entries = merged["$push"]["_outbox"]["$each"]
    assert [e["id"] for e in entries] == [Binary.from_uuid(first.id), Binary.from_uuid(second.id)]
    assert entries[0]["headers"] == [["tenant", "eu"]]
    assert entries[0]["payload"] == b'{"seq":1}'
    assert entries[0]["aggregate_id"] == "42"
    assert entries[0]["content_type"] == "application/json"
    assert entries[0]["topic"] is None
    assert entries[0]["v"] == 1


def test_with_events_uses_the_configured_field() -> None:
    merged = outbox_mongo.with_events({}, event(), field="pending")
    assert list(merged) == ["$push"]
    assert list(merged["$push"]) == ["pending"]


@pytest.mark.parametrize("update", [
    {"$push": {"_outbox": {"id": 1}}},
    {"$set": {"_outbox": []}},
    {"$set": {"_outbox.0.topic": "x"}},
    {"$unset": {"_outbox": ""}},
    {"$pull": {"_outbox": {"id": 1}}},
    {"$rename": {"other": "_outbox"}},
    {"$rename": {"_outbox": "other"}},
])
def test_an_update_that_already_writes_the_outbox_field_is_refused(update: dict[str, Any]) -> None:
    with pytest.raises(outbox_mongo.OutboxFieldConflictError, match="_outbox"):
        outbox_mongo.with_events(update, event())


def test_a_field_that_only_starts_like_the_outbox_field_is_not_a_conflict() -> None:
    merged = outbox_mongo.with_events({"$set": {"_outbox_relayed_at": 1, "_outboxes": 2}}, event())
    assert "_outbox" in merged["$push"]


@pytest.mark.parametrize(("update", "message"), [
    ({"state": "APPROVED"}, "new_document"),
    ([{"$set": {"a": 1}}], "pipeline"),
    ({"$set": 5}, "mapping"),
])
def test_replacement_documents_and_pipelines_are_refused(update: Any, message: str) -> None:
    with pytest.raises(InvalidEventError, match=message):
        outbox_mongo.with_events(update, event())


def test_non_serialisable_payload_is_refused_before_anything_is_built() -> None:
    bad = outbox.Event("Order", "42", "OrderChanged", {"when": dt.datetime.now()})
    with pytest.raises(InvalidEventError, match="not serialisable"):
        outbox_mongo.with_events({"$set": {"a": 1}}, bad)
    with pytest.raises(InvalidEventError, match="not serialisable"):
        outbox_mongo.new_document({"_id": 1}, bad)


def test_payload_over_the_configured_maximum_is_refused() -> None:
    small = outbox_mongo.MongoOutbox(max_payload_bytes=100)
    with pytest.raises(outbox.PayloadTooLargeError, match="max_payload_bytes"):
        small.with_events({}, outbox.Event("Order", "1", "Big", {"pad": "x" * 200}))


def test_new_document_fills_the_field_and_keeps_the_business_fields() -> None:
    created = event()
    document = outbox_mongo.new_document({"_id": 42, "state": "PENDING"}, created)
    assert document["state"] == "PENDING"
    assert [outbox_mongo.decode_entry(e).id for e in document["_outbox"]] == [created.id]
    assert outbox_mongo.new_document({"_id": 1}) == {"_id": 1}


def test_new_document_refuses_a_document_that_already_has_pending_events() -> None:
    with pytest.raises(outbox_mongo.OutboxFieldConflictError):
        outbox_mongo.new_document({"_id": 1, "_outbox": [{"id": 1}]}, event())
    # An empty list is no conflict.
    assert len(outbox_mongo.new_document({"_id": 1, "_outbox": []}, event())["_outbox"]) == 1


def test_a_document_over_16_mib_because_of_its_events_is_refused() -> None:
    big = outbox_mongo.MongoOutbox(max_payload_bytes=10 * 1024 * 1024)
    events = [outbox.Event("Order", "1", "Big", b"x" * (6 * 1024 * 1024)) for _ in range(3)]
    with pytest.raises(outbox_mongo.DocumentTooLargeError, match="16777216"):
        big.new_document({"_id": 1}, *events)
    with pytest.raises(outbox_mongo.DocumentTooLargeError):
        big.with_events({"$set": {"a": 1}}, *events)
    # With the document the caller holds, the check includes it.
    held = {"_id": 1, "blob": b"y" * (11 * 1024 * 1024)}
    with pytest.raises(outbox_mongo.DocumentTooLargeError, match="added to a document"):
        big.with_events({"$set": {"a": 1}}, events[0], document=held)
    assert big.with_events({"$set": {"a": 1}}, events[0])["$push"]


def test_a_document_that_is_not_bson_is_refused_with_an_outbox_error() -> None:
    with pytest.raises(InvalidEventError, match="BSON"):
        outbox_mongo.new_document({"_id": 1, "bad": object()}, event())


@pytest.mark.parametrize("field", ["", "a.b", "$x", 5])
def test_invalid_field_names_are_configuration_errors(field: Any) -> None:
    with pytest.raises(ConfigurationError, match="field"):
        outbox_mongo.MongoOutbox(field=field)


def test_entries_round_trip_to_the_record_the_relay_publishes() -> None:
    original = outbox.Event(
        "Order", "42", "OrderShipped", b"\x00\x01", content_type="application/x-thing",
        headers={"a.b": "1", "$c": "2"}, topic="orders.v1")
    (entry,) = outbox_mongo.MongoOutbox(capture_trace_context=False).entries([original])
    record = outbox_mongo.decode_entry(entry)
    assert record.id == original.id
    assert (record.aggregate_type, record.aggregate_id, record.event_type) == (
        "Order", "42", "OrderShipped")
    assert record.payload == b"\x00\x01"
    assert record.content_type == "application/x-thing"
    assert record.headers == {"a.b": "1", "$c": "2"}
    assert record.topic == "orders.v1"
    assert record.created_at is not None and record.created_at.tzinfo is not None


@pytest.mark.parametrize(("change", "message"), [
    ({"v": 2}, "version"),
    ({"aggregate_id": ""}, "aggregate_id"),
    ({"payload": "text"}, "payload"),
    ({"headers": [["a", 1]]}, "header"),
    ({"headers": "nope"}, "headers"),
    ({"id": "not-a-uuid"}, "UUID"),
    ({"topic": 3}, "topic"),
])
def test_malformed_entries_are_reported_with_what_is_wrong(
    change: dict[str, Any], message: str
) -> None:
    (entry,) = outbox_mongo.MongoOutbox().entries([event()])
    entry.update(change)
    with pytest.raises(InvalidEventError, match=message):
        outbox_mongo.decode_entry(entry)


def test_entries_written_by_other_tools_decode_too() -> None:
    event_id = uuid.uuid4()
    record = outbox_mongo.decode_entry({
        "id": str(event_id), "aggregate_type": "Order", "aggregate_id": "1",
        "event_type": "X", "content_type": "application/json", "payload": b"{}",
        "headers": {"tenant": "eu"}})
    assert record.id == event_id
    assert record.headers == {"tenant": "eu"}
    assert record.created_at is None


def test_aggregate_id_is_inferred_from_the_document_id() -> None:
    oid = ObjectId()
    assert outbox_mongo.aggregate_id({"_id": oid}) == str(oid)
    assert outbox_mongo.aggregate_id(42) == "42"
    assert outbox_mongo.aggregate_id("order-7") == "order-7"
    key = uuid.uuid4()
    assert outbox_mongo.aggregate_id(Binary.from_uuid(key)) == str(key)
    made = outbox_mongo.event_for({"_id": 42}, "Order", "OrderCreated", {"n": 1},
                                  headers={"h": "v"})
    assert (made.aggregate_id, made.headers) == ("42", {"h": "v"})
    with pytest.raises(InvalidEventError, match="no _id"):
        outbox_mongo.event_for({"state": "new"}, "Order", "OrderCreated")
    with pytest.raises(InvalidEventError, match="aggregate id"):
        outbox_mongo.aggregate_id({"_id": {"compound": 1}})


def test_publish_refuses_to_write_outside_a_transaction_before_any_io() -> None:
    # connect=False: a write attempt would fail on server selection, not on our check.
    client: MongoClient[dict[str, Any]] = MongoClient(
        "mongodb://127.0.0.1:1/x", connect=False, serverSelectionTimeoutMS=1)
    try:
        with pytest.raises(AtomicityError, match="transaction"):
            outbox_mongo.publish(client.x, event())
        with pytest.raises(UnsupportedTargetError, match="Database or Collection"):
            outbox_mongo.publish("outbox", event())  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError):
            outbox_mongo.publish(client.x, "not an event", session=None,  # type: ignore[arg-type]
                                 allow_without_transaction=True)
    finally:
        client.close()

"""Typed events: declaring, validating, publishing as outbox.Event, and typed consumer handlers
(driven against the in-memory inbox; no services)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import threading
import uuid
from typing import Any, Literal

import pydantic
import pytest

import outbox
from outbox.consumer import AsyncConsumer, Consumer, Message
from outbox.consumer.aio import AsyncDriver
from outbox.consumer.engine import BatchReport, Outcome
from outbox.consumer.message import Received, parse
from outbox.consumer.runner import SyncDriver
from outbox.consumer.testing import AsyncMemoryInbox, MemoryInbox, MemorySession
from outbox.contracts.registry import VERSION_HEADER, EventRegistry
from outbox.errors import ConfigurationError

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

registry = EventRegistry()


class Status(enum.Enum):
    NEW = "new"
    PAID = "paid"


@dataclasses.dataclass
class Line:
    sku: str
    quantity: int


@registry.event_type("OrderCreated", aggregate="Order", version=1, id_field="order_id")
@dataclasses.dataclass
class OrderCreated:
    """An order was placed."""

    order_id: uuid.UUID
    total: float
    placed_at: dt.datetime
    lines: list[Line]
    status: Status = Status.NEW
    note: str | None = None


@registry.event_type("OrderCreated", aggregate="Order", version=2, id_field="order_id")
class OrderCreatedV2(pydantic.BaseModel):
    order_id: str
    total_cents: int = pydantic.Field(ge=0)
    channel: Literal["web", "shop"]


@registry.event_type("OrderShipped", aggregate="Order")
class OrderShipped(pydantic.BaseModel):
    carrier: str


def order(**changes: Any) -> OrderCreated:
    values: dict[str, Any] = {"order_id": uuid.UUID(int=7), "total": 12.5, "placed_at": NOW,
                              "lines": [Line("A-1", 2)]}
    return OrderCreated(**{**values, **changes})


# -- declaring -----------------------------------------------------------------------------------


def test_a_dataclass_event_becomes_an_outbox_event_with_its_version_header() -> None:
    event = outbox.Event.of(order(), headers={"tenant": "eu"})
    assert (event.aggregate_type, event.aggregate_id, event.event_type) == (
        "Order", str(uuid.UUID(int=7)), "OrderCreated")
    assert event.headers == {"tenant": "eu", VERSION_HEADER: "1"}
    assert json.loads(event.encode_payload()) == {
        "order_id": str(uuid.UUID(int=7)), "total": 12.5, "placed_at": NOW.isoformat(),
        "lines": [{"sku": "A-1", "quantity": 2}], "status": "new", "note": None}


def test_a_pydantic_event_is_validated_again_when_published() -> None:
    model = OrderCreatedV2(order_id="o-1", total_cents=100, channel="web")
    assert outbox.Event.of(model).headers == {VERSION_HEADER: "2"}
    model.total_cents = -5  # no validate_assignment: only the publish-time check sees it
    with pytest.raises(outbox.EventValidationError, match="total_cents"):
        outbox.Event.of(model)


def test_the_outbox_records_typed_instances_next_to_plain_events() -> None:
    records = outbox.Outbox(capture_trace_context=False).records(
        [order(), outbox.Event("Order", "1", "Other", {"a": 1})])
    assert [r.event_type for r in records] == ["OrderCreated", "Other"]
    assert records[0].headers[VERSION_HEADER] == "1"


@pytest.mark.parametrize(("changes", "error"), [
    ({"total": "12"}, "total: expected a number, got str"),
    ({"lines": [Line("A", "2")]}, r"lines\[0\].quantity: expected an integer"),
    ({"placed_at": dt.datetime(2026, 1, 1)}, "placed_at: expected a timezone-aware"),
    ({"status": "paid"}, r"status: expected one of \['new', 'paid'\]"),
])
def test_an_invalid_dataclass_event_is_refused_naming_the_field(
        changes: dict[str, Any], error: str) -> None:
    with pytest.raises(outbox.EventValidationError, match=error):
        outbox.Outbox().records([order(**changes)])


def test_aggregate_id_comes_from_id_field_or_the_caller() -> None:
    assert outbox.Event.of(order(), aggregate_id="other").aggregate_id == "other"
    with pytest.raises(outbox.InvalidEventError, match="declares no id_field"):
        outbox.Event.of(OrderShipped(carrier="dhl"))
    assert outbox.Event.of(OrderShipped(carrier="dhl"), aggregate_id="9").aggregate_id == "9"


def test_an_undeclared_object_is_refused() -> None:
    @dataclasses.dataclass
    class Loose:
        a: int

    with pytest.raises(outbox.InvalidEventError, match="@outbox.event_type, got Loose"):
        outbox.Outbox().records([Loose(1)])


def test_bad_declarations_fail_when_the_class_is_declared() -> None:
    own = EventRegistry()
    with pytest.raises(ConfigurationError, match="not supported"):
        @own.event_type("A", aggregate="X")
        @dataclasses.dataclass
        class A:
            when: set[int]
    with pytest.raises(ConfigurationError, match="neither a pydantic model nor a dataclass"):
        own.event_type("B", aggregate="X")(type("B", (), {}))
    with pytest.raises(ConfigurationError, match="id_field='nope'"):
        own.event_type("C", aggregate="X", id_field="nope")(
            dataclasses.make_dataclass("C", [("a", int)]))
    with pytest.raises(ConfigurationError, match="already declared"):
        registry.event_type("OrderCreated", aggregate="Order", version=1)(
            dataclasses.make_dataclass("D", [("a", int)]))
    with pytest.raises(ConfigurationError, match="already an event type"):
        own.event_type("Other", aggregate="Order")(OrderShipped)
    with pytest.raises(ConfigurationError, match="version=0"):
        own.event_type("E", aggregate="X", version=0)


def test_the_default_registry_is_behind_outbox_event_type() -> None:
    from outbox.contracts.registry import default_registry, entry_of

    @outbox.event_type("PingedForTest", aggregate="Ping", version=3)
    @dataclasses.dataclass
    class Pinged:
        at: dt.datetime

    entry = entry_of(Pinged)
    assert entry is not None and default_registry.get("PingedForTest", 3) is entry


def test_dataclass_json_schema() -> None:
    schema = registry.entry(OrderCreated).json_schema()
    assert schema["required"] == ["order_id", "total", "placed_at", "lines"]
    assert schema["properties"]["lines"] == {"type": "array", "items": {"$ref": "#/$defs/Line"}}
    assert schema["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert schema["$defs"]["Line"]["properties"]["quantity"] == {"type": "integer"}


# -- typed handlers ------------------------------------------------------------------------------


def message(n: int, entry_type: str, payload: Any, version: str | None) -> Received:
    headers = [("id", str(uuid.UUID(int=n + 1)).encode()), ("event_type", entry_type.encode())]
    if version is not None:
        headers.append((VERSION_HEADER, version.encode()))
    return parse("Order", 0, n, b"k", json.dumps(payload).encode(), headers)


def valid_v1() -> Any:
    return json.loads(outbox.Event.of(order()).encode_payload())


def drive(consumer: Consumer, store: MemoryInbox, items: list[Received]) -> dict[int, Outcome]:
    report = SyncDriver(store, consumer, threading.Event()).run(items)
    reasons.clear()
    reasons.extend(request.reason for request in report.dead_letters)
    return report.outcomes


reasons: list[str] = []


def test_a_handler_for_classes_gets_the_model_of_the_message_version() -> None:
    store = MemoryInbox("billing")
    consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=store)
    seen: list[Any] = []

    @consumer.handler(OrderCreated, OrderCreatedV2)
    def on_created(session: MemorySession, event: OrderCreated | OrderCreatedV2,
                   raw: Message) -> None:
        seen.append((event, raw.offset))

    outcomes = drive(consumer, store, [
        message(0, "OrderCreated", valid_v1(), "1"),
        message(1, "OrderCreated", {"order_id": "o", "total_cents": 3, "channel": "shop"}, "2"),
    ])
    assert outcomes == {0: Outcome.PROCESSED, 1: Outcome.PROCESSED}
    assert seen == [(order(), 0), (OrderCreatedV2(order_id="o", total_cents=3, channel="shop"), 1)]
    assert on_created.__name__ == "on_created"  # the decorator gives the function back


@pytest.mark.parametrize(("payload", "version", "reason"), [
    ({"order_id": "o", "total_cents": -1, "channel": "web"}, "2",
     "invalid OrderCreated v2 (OrderCreatedV2): total_cents: Input should be greater than"),
    ({"order_id": "not-a-uuid"}, "1", "invalid OrderCreated v1 (OrderCreated): order_id: "
                                      "expected a UUID"),
    ({}, "9", "OrderCreated event_version '9' is unknown here"),
    ({}, None, "without an event_version header"),
])
def test_an_invalid_or_unknown_payload_is_dead_lettered_at_once_with_the_error(
        payload: Any, version: str | None, reason: str) -> None:
    store = MemoryInbox("billing")
    consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=store)
    calls: list[Any] = []
    consumer.handler(OrderCreated, OrderCreatedV2)(lambda session, event: calls.append(event))

    outcomes = drive(consumer, store, [message(0, "OrderCreated", payload, version),
                                       message(1, "OrderCreated", valid_v1(), "1")])
    assert outcomes == {0: Outcome.DEAD_LETTER, 1: Outcome.PROCESSED}
    assert len(reasons) == 1 and reasons[0].startswith("RejectMessage: ")
    assert reason in reasons[0]
    assert calls == [order()]


def test_a_payload_without_version_header_is_read_by_the_only_declared_version() -> None:
    store = MemoryInbox("billing")
    consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=store)
    calls: list[Any] = []
    consumer.handler(OrderShipped)(lambda session, event: calls.append(event))
    assert drive(consumer, store, [message(0, "OrderShipped", {"carrier": "ups"}, None)]) == {
        0: Outcome.PROCESSED}
    assert calls == [OrderShipped(carrier="ups")]


def test_typed_handler_registration_rules() -> None:
    consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=MemoryInbox("billing"))
    with pytest.raises(ConfigurationError, match="not both"):
        consumer.handler(OrderShipped, "OrderCreated")
    with pytest.raises(ConfigurationError, match="not declared"):
        consumer.handler(Line)(lambda session, event: None)
    consumer.handler(OrderShipped)(lambda session, event: None)
    with pytest.raises(ConfigurationError, match="already registered"):
        consumer.handler("OrderShipped")(lambda session, message: None)
    assert registry.consumed[("OrderShipped", 1)] >= {"billing"}


def test_the_async_consumer_hands_models_to_async_handlers_and_rejects_invalid_ones() -> None:
    store = AsyncMemoryInbox("billing")
    consumer = AsyncConsumer(name="billing", kafka=KAFKA, topics=["Order"], db=store)

    @consumer.handler(OrderShipped)
    async def on_shipped(session: MemorySession, event: OrderShipped) -> None:
        session.add(event)

    with pytest.raises(ConfigurationError, match="async def"):
        consumer.handler(OrderCreated)(lambda session, event: None)

    async def go() -> BatchReport:
        return await AsyncDriver(store, consumer, asyncio.Event()).run([
            message(0, "OrderShipped", {"carrier": "ups"}, "1"),
            message(1, "OrderShipped", {"carrier": 5}, "1"),
        ])

    report = asyncio.run(go())
    assert report.outcomes == {0: Outcome.PROCESSED, 1: Outcome.DEAD_LETTER}
    assert "carrier: Input should be a valid string" in report.dead_letters[0].reason
    assert store.inbox.effects == [OrderShipped(carrier="ups")]


def test_mongo_documents_take_typed_events() -> None:
    from outbox import mongo as outbox_mongo

    document = outbox_mongo.new_document({"_id": 7}, order())
    [entry] = document[outbox_mongo.DEFAULT_FIELD]
    assert entry["event_type"] == "OrderCreated"
    assert entry["headers"] == [[VERSION_HEADER, "1"]]

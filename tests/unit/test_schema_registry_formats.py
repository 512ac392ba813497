"""Schema Registry formats without a registry: the wire format's framing, the settings, and a
typed handler reading a JSON Schema payload (the registry itself: test_schema_registry.py)."""

from __future__ import annotations

import dataclasses
import threading
import uuid

import pytest

import outbox
from outbox.consumer import Consumer
from outbox.consumer.engine import Outcome
from outbox.consumer.message import parse
from outbox.consumer.runner import SyncDriver
from outbox.consumer.testing import MemoryInbox
from outbox.contracts import wire
from outbox.contracts.registry import VERSION_HEADER, EventRegistry
from outbox.contracts.schema_registry import SchemaRegistryFormats
from outbox.errors import ConfigurationError

registry = EventRegistry()


@registry.event_type("OrderPaid", aggregate="Order", id_field="order_id")
@dataclasses.dataclass
class OrderPaid:
    order_id: str
    cents: int


def framed(schema_id: int, body: bytes) -> bytes:
    return bytes([wire.MAGIC_BYTE]) + schema_id.to_bytes(4, "big") + body


def test_the_wire_format_header() -> None:
    assert wire.schema_id(framed(70000, b"{}")) == 70000
    assert wire.json_body(framed(1, b'{"a":1}')) == b'{"a":1}'
    for bad in (b"", b"\x00\x00", b'{"a":1}'):
        with pytest.raises(outbox.EventValidationError, match="Confluent wire format"):
            wire.schema_id(bad)


def test_settings_are_checked_when_made() -> None:
    with pytest.raises(ConfigurationError, match="url= or client="):
        SchemaRegistryFormats()
    with pytest.raises(ConfigurationError, match="subject_template"):
        SchemaRegistryFormats("http://127.0.0.1:9", subject_template="{topic}-value")


@pytest.mark.parametrize(("payload", "outcome"), [
    (framed(3, b'{"order_id":"o-1","cents":5}'), Outcome.PROCESSED),
    (framed(3, b'{"order_id":"o-1","cents":"5"}'), Outcome.DEAD_LETTER),
    (b'{"order_id":"o-1","cents":5}', Outcome.DEAD_LETTER),  # not framed
])
def test_a_typed_handler_reads_json_schema_payloads(payload: bytes, outcome: Outcome) -> None:
    store = MemoryInbox("billing")
    consumer = Consumer(name="billing", kafka={"bootstrap.servers": "127.0.0.1:9"},
                        topics=["Order"], db=store)
    consumer.handler(OrderPaid)(lambda session, event: session.add(event))
    headers = [("id", str(uuid.uuid4()).encode()), ("event_type", b"OrderPaid"),
               ("content_type", wire.JSON_SCHEMA_CONTENT_TYPE.encode()),
               (VERSION_HEADER, b"1")]
    item = parse("Order", 0, 0, b"o-1", payload, headers)
    report = SyncDriver(store, consumer, threading.Event()).run([item])
    assert report.outcomes == {0: outcome}
    if outcome is Outcome.PROCESSED:
        assert store.effects == [OrderPaid("o-1", 5)]

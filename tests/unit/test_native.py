"""The compiled hot path (relay/native.py, native/src/lib.rs) gives what the Python code gives.

The row reader is compared with the pure-Python one on every decoder test
(tests/unit/test_pgoutput_decoder.py runs each with both); the Kafka headers here.
"""

from __future__ import annotations

import uuid

import pytest

import relay.native
from outbox.record import OutboxRecord
from relay.sinks.kafka import sink
from relay.sinks.kafka.sink import header_builder, kafka_headers

pytestmark = pytest.mark.skipif(
    relay.native.module is None, reason="the compiled hot path is not built (`make native`)")


class TextId(uuid.UUID):
    """A UUID subclass with its own text: the compiled builder must use its `str`."""

    def __str__(self) -> str:
        return "custom-" + super().__str__()


def record(**fields: object) -> OutboxRecord:
    base = OutboxRecord(uuid.UUID(int=0x0123456789ABCDEF0011223344556677), "Order", "42",
                        "OrderCreated", b"{}", "application/json")
    return base._replace(**fields)


@pytest.mark.parametrize("example", [
    record(),
    record(id=uuid.UUID(int=0)),
    record(id=uuid.UUID(int=2**128 - 1)),
    record(id=uuid.uuid4()),
    record(id=TextId(int=5)),
    record(headers={"tenant": "eu", "traceparent": "00-abc-def-01"}),
    record(headers={"id": "forged", "event_type": "forged", "x": "\u2603 sn\u00f6w"}),
    record(event_type="Caf\u00e9", aggregate_type="\u00c4", content_type="text/plain"),
])
def test_compiled_headers_equal_the_python_ones(example: OutboxRecord) -> None:
    built = header_builder()
    assert built is not kafka_headers
    assert built(example) == kafka_headers(example)
    assert [type(name) for name, _ in built(example)] == [str] * len(built(example))


def test_the_id_text_is_the_canonical_form() -> None:
    for _ in range(1000):
        example = record(id=uuid.uuid4())
        assert header_builder()(example)[0] == ("id", str(example.id))


def test_without_the_compiled_module_the_python_function_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay.native, "module", None)
    assert sink.header_builder() is kafka_headers

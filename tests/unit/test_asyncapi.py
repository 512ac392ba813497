"""`outbox asyncapi`: the AsyncAPI 3.0 document of an event registry, validated against the
official AsyncAPI 3.0.0 JSON Schema (vendored in tests/unit/data/asyncapi, no fetch)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml
from typer.testing import CliRunner

import outbox
from outbox.cli import app
from outbox.consumer import Consumer
from outbox.contracts import asyncapi
from outbox.contracts.registry import EventRegistry
from outbox.errors import ConfigurationError

SCHEMA = Path(__file__).parent / "data" / "asyncapi" / "asyncapi-3.0.0.schema.json"

registry = EventRegistry(title="shop")


@dataclasses.dataclass
class Line:
    sku: str
    quantity: int


@registry.event_type("OrderCreated", aggregate="Order", version=1, id_field="order_id")
@dataclasses.dataclass
class OrderCreated:
    """An order was placed."""

    order_id: uuid.UUID
    lines: list[Line]


class LineV2(pydantic.BaseModel):
    """A line of a version 2 order: the same name as the dataclass in another shape."""

    sku: str
    cents: int


class Line2(pydantic.BaseModel):
    sku: str


@registry.event_type("OrderCreated", aggregate="Order", version=2, id_field="order_id")
class OrderCreatedV2(pydantic.BaseModel):
    order_id: str
    lines: list[LineV2]


@registry.event_type("PaymentTaken", aggregate="Payment")
class PaymentTaken(pydantic.BaseModel):
    amount_cents: int


billing = Consumer(name="billing", kafka={"bootstrap.servers": "127.0.0.1:9"}, topics=["Order"],
                   db="postgresql://127.0.0.1:9/none")


@billing.handler(OrderCreatedV2)
def on_created(session: Any, event: OrderCreatedV2) -> None:
    return None


@cache
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def assert_valid(document: dict[str, Any]) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:300]}"
              for e in validator().iter_errors(document)]
    assert errors == []
    # The schema does not check that local references resolve: walk them.
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return own + [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def test_the_document_is_valid_asyncapi_3() -> None:
    document = asyncapi.document(registry)
    assert_valid(document)
    assert document["asyncapi"] == "3.0.0" and document["info"]["title"] == "shop"
    assert set(document["channels"]) == {"Order", "Payment"}
    assert set(document["channels"]["Order"]["messages"]) == {"OrderCreated.v1",
                                                              "OrderCreated.v2"}


def test_messages_carry_payload_headers_and_key() -> None:
    document = asyncapi.document(registry)
    message = document["components"]["messages"]["OrderCreated.v1"]
    assert message["summary"] == "An order was placed."
    headers = message["headers"]
    assert headers["required"] == ["id", "event_type", "aggregate_type", "content_type",
                                   "event_version"]
    assert {"sequence", "traceparent", "tracestate"} <= set(headers["properties"])
    assert headers["properties"]["event_version"]["const"] == "1"
    assert message["bindings"]["kafka"]["key"]["type"] == "string"
    schemas = document["components"]["schemas"]
    assert message["payload"] == {"$ref": "#/components/schemas/OrderCreated.v1"}
    assert schemas["OrderCreated.v1"]["properties"]["lines"]["items"] == {
        "$ref": "#/components/schemas/Line"}
    # The pydantic model's nested class is hoisted out of its $defs as well.
    assert schemas["OrderCreated.v2"]["properties"]["lines"]["items"] == {
        "$ref": "#/components/schemas/LineV2"}
    assert schemas["LineV2"]["required"] == ["sku", "cents"]


def test_operations_send_every_type_and_receive_what_typed_handlers_take() -> None:
    operations = asyncapi.document(registry)["operations"]
    assert operations["send.Order"]["action"] == "send"
    assert len(operations["send.Order"]["messages"]) == 2
    assert operations["receive.billing.Order"] == {
        "action": "receive", "channel": {"$ref": "#/channels/Order"},
        "summary": "Consumer 'billing' applies these events exactly once.",
        "messages": [{"$ref": "#/channels/Order/messages/OrderCreated.v2"}],
    }


def test_topic_template_names_the_channels_and_aggregate_id_is_a_parameter() -> None:
    document = asyncapi.document(registry, topic_template="shop.{aggregate_type}.{aggregate_id}")
    assert_valid(document)
    channel = document["channels"]["shop.Order.aggregate_id"]
    assert channel["address"] == "shop.Order.{aggregate_id}"
    assert set(channel["parameters"]) == {"aggregate_id"}
    with pytest.raises(ConfigurationError, match="topic_template"):
        asyncapi.document(registry, topic_template="{tenant}")


def test_clashing_nested_names_are_kept_apart() -> None:
    own = EventRegistry()

    @own.event_type("A", aggregate="X")
    class A(pydantic.BaseModel):
        line: Line2

    Other = pydantic.create_model("Line2", qty=(int, ...))  # same name, other shape

    @own.event_type("B", aggregate="X")
    class B(pydantic.BaseModel):
        line: Other  # type: ignore[valid-type]

    document = asyncapi.document(own)
    assert_valid(document)
    schemas = document["components"]["schemas"]
    assert schemas["Line2"]["required"] == ["sku"]
    assert schemas["B.v1.Line2"]["required"] == ["qty"]


def test_the_cli_writes_yaml_or_json(tmp_path: Path) -> None:
    runner = CliRunner()
    spec = f"{__name__}:registry"
    result = runner.invoke(app, ["asyncapi", "--app", spec, "--title", "Shop events"])
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.output)
    assert_valid(document)
    assert document["info"]["title"] == "Shop events"

    target = tmp_path / "asyncapi.json"
    result = runner.invoke(app, ["asyncapi", "--app", spec, "--format", "json", "-o",
                                 str(target), "--topic-template", "t.{aggregate_type}"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(target.read_text())["channels"]) == {"t.Order", "t.Payment"}


@pytest.mark.parametrize(("args", "error"), [
    (["--app", "no_such_module_here:registry"], "cannot import no_such_module_here"),
    (["--app", f"{__name__}:billing"], "is Consumer, not an outbox.EventRegistry"),
    (["--app", f"{__name__}:registry", "--format", "xml"], "choose yaml or json"),
])
def test_the_cli_names_what_is_wrong(args: list[str], error: str) -> None:
    result = CliRunner().invoke(app, ["asyncapi", *args])
    assert result.exit_code == 1
    assert error in result.output


def test_the_default_registry_is_used_for_a_bare_module() -> None:
    @outbox.event_type("AsyncapiProbe", aggregate="Probe")
    @dataclasses.dataclass
    class Probe:
        n: int

    result = CliRunner().invoke(app, ["asyncapi", "--app", __name__, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "AsyncapiProbe.v1" in json.loads(result.output)["components"]["messages"]

"""The AsyncAPI 3.0 document of an event registry: what a service publishes and consumes
(no I/O; `outbox asyncapi` writes it).

A channel per topic (the relay's topic template over the aggregate type), a message per declared
event type and version with its payload schema, the Kafka headers the relay sets, and its key
(the aggregate id). A `send` operation per channel for what the service publishes (every
declared type); a `receive` operation per consumer and channel for the types its typed
handlers take (`EventRegistry.consumed`).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from outbox.contracts.registry import VERSION_HEADER, EventRegistry, EventType
from outbox.errors import ConfigurationError

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
DEFAULT_TOPIC_TEMPLATE = "{aggregate_type}"
_KEY = re.compile(r"[^\w.\-]")


def _component_key(text: str) -> str:
    return _KEY.sub("_", text)


def message_key(entry: EventType) -> str:
    return _component_key(f"{entry.name}.v{entry.version}")


def topic_of(entry: EventType, template: str) -> str:
    """The topic (channel address) of `entry`'s events; a template over `{aggregate_id}`
    keeps it as an AsyncAPI channel parameter."""
    try:
        return template.format(aggregate_type=entry.aggregate, event_type=entry.name,
                               aggregate_id="{aggregate_id}")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"topic_template={template!r} is not a template over {{aggregate_type}}, "
            f"{{aggregate_id}} and {{event_type}} (as the relay's --topic-template): {exc!r}"
        ) from None


def headers_schema(entry: EventType) -> dict[str, Any]:
    """The Kafka headers of `entry`'s messages: the relay's reserved ones, the version, and
    the optional ones (sequence numbers, W3C trace context)."""
    text = {"type": "string"}
    return {
        "type": "object",
        "required": ["id", "event_type", "aggregate_type", "content_type", VERSION_HEADER],
        "properties": {
            "id": {**text, "format": "uuid",
                   "description": "Event id (UUIDv7): the consumers' deduplication key."},
            "event_type": {**text, "const": entry.name},
            "aggregate_type": {**text, "const": entry.aggregate},
            "content_type": {**text, "const": "application/json"},
            VERSION_HEADER: {**text, "const": str(entry.version),
                             "description": "Version of the event type's payload schema."},
            "sequence": {**text, "pattern": r"^[0-9]+$",
                         "description": "Per-aggregate sequence number, when the writer "
                                        "numbers events (Outbox(sequence=True))."},
            "traceparent": {**text, "description": "W3C trace context of the writer's span."},
            "tracestate": {**text, "description": "W3C trace state."},
        },
    }


class _Schemas:
    """components/schemas: payload schemas, with their `$defs` hoisted so that every `$ref`
    resolves inside the document (a `#/$defs/...` inside a payload would point at the
    document's root)."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def add(self, key: str, schema: dict[str, Any]) -> dict[str, str]:
        schema = copy.deepcopy(schema)
        defs = schema.pop("$defs", {})
        renames: dict[str, str] = {}
        for name, definition in defs.items():
            target = _component_key(name)
            if target in self.schemas and self.schemas[target] != definition:
                target = _component_key(f"{key}.{name}")
            renames[name] = target
        for name, definition in defs.items():
            self.schemas[renames[name]] = _rewrite(definition, renames)
        self.schemas[key] = _rewrite(schema, renames)
        return {"$ref": f"#/components/schemas/{key}"}


def _rewrite(value: Any, renames: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                out[k] = f"#/components/schemas/{renames[v.removeprefix('#/$defs/')]}"
            else:
                out[k] = _rewrite(v, renames)
        return out
    if isinstance(value, list):
        return [_rewrite(v, renames) for v in value]
    return value


def document(
    registry: EventRegistry,
    *,
    topic_template: str = DEFAULT_TOPIC_TEMPLATE,
    title: str | None = None,
    version: str = "1.0.0",
    description: str | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `registry`, as plain JSON values."""
    schemas = _Schemas()
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    channel_of: dict[str, str] = {}
    for entry in registry:
        key = message_key(entry)
        message: dict[str, Any] = {
            "name": entry.name,
            "title": f"{entry.name} v{entry.version}",
            "contentType": "application/json",
            "headers": headers_schema(entry),
            "payload": schemas.add(key, entry.json_schema()),
            "bindings": {"kafka": {
                "key": {"type": "string",
                        "description": f"The {entry.aggregate} aggregate id; events of one "
                                       "aggregate keep their order."},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }},
        }
        if entry.description:
            message["summary"] = entry.description
        messages[key] = message
        address = topic_of(entry, topic_template)
        channel_id = _component_key(address.replace("{aggregate_id}", "aggregate_id"))
        channel = channels.setdefault(channel_id, {"address": address, "messages": {}})
        if "{aggregate_id}" in address:
            channel["parameters"] = {"aggregate_id": {"description": "The aggregate id."}}
        channel["messages"][key] = {"$ref": f"#/components/messages/{key}"}
        channel_of[key] = channel_id

    operations: dict[str, Any] = {}
    for channel_id, channel in channels.items():
        operations[_component_key(f"send.{channel_id}")] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Events the service publishes to {channel['address']} "
                       "(through its outbox and relay).",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{key}"}
                         for key in channel["messages"]],
        }
    received: dict[tuple[str, str], list[str]] = {}
    for (name, event_version), consumers in sorted(registry.consumed.items()):
        handled = registry.get(name, event_version)
        if handled is None:
            continue
        key = message_key(handled)
        for consumer in sorted(consumers):
            received.setdefault((consumer, channel_of[key]), []).append(key)
    for (consumer, channel_id), keys in received.items():
        operations[_component_key(f"receive.{consumer}.{channel_id}")] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Consumer {consumer!r} applies these events exactly once.",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{key}"} for key in keys],
        }

    info: dict[str, Any] = {"title": title or registry.title, "version": version}
    if description:
        info["description"] = description
    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas.schemas},
    }
    return doc

"""Schema Registry formats: event payloads in Avro, Protobuf or JSON Schema, in the Confluent
wire format, serialised by confluent-kafka's `schema_registry` serializers
(`pip install 'outbox-relay[schema-registry]'`).

Serialisation happens on the writer's side, when the event is built: the outbox stores the
framed bytes with a content type, and the relay publishes them unchanged. So the relay stays
format-agnostic and needs no registry access or credentials; a schema the registry refuses
(incompatible, unreachable registry) fails in the writer's transaction, before commit, instead
of parking events in the relay; and what the table holds is byte for byte what Kafka, the dead
letters and replays carry. The cost: writers need the registry (the first event of each schema
registers or looks it up, one HTTP round trip, then it is cached), and these payloads are not
JSON in the table.

Subjects are per event type (`{aggregate_type}.{event_type}` by default), not per topic: the
events of one aggregate share a topic and have different schemas.
"""

from __future__ import annotations

import datetime as dt
import importlib
import uuid
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from outbox.contracts.registry import event_fields
from outbox.contracts.wire import (
    AVRO_CONTENT_TYPE,
    JSON_SCHEMA_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
)
from outbox.errors import ConfigurationError, InvalidEventError, MissingExtraError
from outbox.event import Event

SCHEMA_REGISTRY_EXTRA = "outbox-relay[schema-registry]"
DEFAULT_SUBJECT_TEMPLATE = "{aggregate_type}.{event_type}"


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"confluent_kafka.schema_registry{name}")
    except ImportError as exc:
        raise MissingExtraError(
            f"Schema Registry formats need confluent-kafka's serializers: "
            f"pip install '{SCHEMA_REGISTRY_EXTRA}' ({exc})") from exc


class SchemaRegistryFormats:
    """Builds `outbox.Event`s whose payloads are framed by a Schema Registry at `url` (its
    Confluent-compatible API), and reads them back in consumers.

    `client_settings` are those of confluent-kafka's SchemaRegistryClient (e.g.
    `basic.auth.user.info`); `auto_register=False` only looks schemas up.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        client_settings: Mapping[str, Any] | None = None,
        subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
        auto_register: bool = True,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("SchemaRegistryFormats needs url= or client=, not both")
        try:
            subject_template.format(aggregate_type="a", event_type="e")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(
                f"subject_template={subject_template!r} may use only {{aggregate_type}} and "
                f"{{event_type}}: {exc!r}") from None
        registry = _module("")
        self.client = client if client is not None else registry.SchemaRegistryClient(
            {**(client_settings or {}), "url": url})
        # A client made here is closed by close(); one passed in is the caller's.
        self._owns_client = client is None
        self.subject_template = subject_template
        self.auto_register = auto_register
        self._serializers: dict[tuple[str, str, Any], Any] = {}
        self._deserializers: dict[tuple[str, Any], Any] = {}

    def close(self) -> None:
        """Close the registry client's HTTP session (if this object made the client)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> SchemaRegistryFormats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def avro(
        self,
        aggregate_type: str,
        aggregate_id: str,
        event_type: str,
        value: Mapping[str, Any],
        schema: str,
        **options: Any,
    ) -> Event:
        """An event whose payload is `value` in Avro, written with `schema` (Avro JSON text)."""
        subject = self.subject(aggregate_type, event_type)
        serializer = self._serializer("avro", subject, schema, lambda module, conf: (
            module.AvroSerializer(self.client, schema, conf=conf)))
        payload = self._serialize(serializer, value, subject, event_type)
        return self._event(aggregate_type, aggregate_id, event_type, payload,
                           AVRO_CONTENT_TYPE, options)

    def protobuf(
        self, aggregate_type: str, aggregate_id: str, event_type: str, message: Any,
        **options: Any,
    ) -> Event:
        """An event whose payload is the Protobuf `message` (an instance of a generated class)."""
        subject = self.subject(aggregate_type, event_type)
        message_type = type(message)
        serializer = self._serializer("protobuf", subject, message_type, lambda module, conf: (
            module.ProtobufSerializer(message_type, self.client,
                                      {**conf, "use.deprecated.format": False})))
        payload = self._serialize(serializer, message, subject, event_type)
        return self._event(aggregate_type, aggregate_id, event_type, payload,
                           PROTOBUF_CONTENT_TYPE, options)

    def json(self, model: Any, aggregate_id: str | None = None, **options: Any) -> Event:
        """An event of a typed-event instance (`@outbox.event_type`) in JSON Schema: its
        schema is the class's, its version header as for `outbox.Event.of`."""
        headers = options.pop("headers", None)
        entry, key, value, all_headers = event_fields(model, aggregate_id, headers)
        subject = self.subject(entry.aggregate, entry.name)
        import json

        schema = json.dumps(entry.json_schema())
        serializer = self._serializer("json", subject, schema, lambda module, conf: (
            module.JSONSerializer(schema, self.client, conf=conf)))
        payload = self._serialize(serializer, value, subject, entry.name)
        return self._event(entry.aggregate, key, entry.name, payload, JSON_SCHEMA_CONTENT_TYPE,
                           {**options, "headers": all_headers})

    def subject(self, aggregate_type: str, event_type: str) -> str:
        return self.subject_template.format(aggregate_type=aggregate_type, event_type=event_type)

    def _serializer(self, kind: str, subject: str, schema: Any, make: Any) -> Any:
        key = (kind, subject, schema)
        serializer = self._serializers.get(key)
        if serializer is None:
            conf = {"auto.register.schemas": self.auto_register,
                    "subject.name.strategy": lambda ctx, record_name: subject}
            serializer = make(_module(f".{kind}_schema" if kind == "json" else f".{kind}"), conf)
            self._serializers[key] = serializer
        return serializer

    def _serialize(self, serializer: Any, value: Any, subject: str, event_type: str) -> bytes:
        serialization = importlib.import_module("confluent_kafka.serialization")
        context = serialization.SerializationContext(subject, serialization.MessageField.VALUE)
        try:
            data = serializer(value, context)
        except Exception as exc:  # the serializers' errors: invalid value, registry refusal
            raise InvalidEventError(
                f"the {event_type} payload cannot be serialised for subject {subject!r}: "
                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(data, bytes):
            raise InvalidEventError(f"the {event_type} payload serialised to nothing")
        return data

    @staticmethod
    def _event(aggregate_type: str, aggregate_id: str, event_type: str, payload: bytes,
               content_type: str, options: Mapping[str, Any]) -> Event:
        unknown = set(options) - {"headers", "topic", "id", "created_at"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        event_id: uuid.UUID | None = options.get("id")
        created_at: dt.datetime | None = options.get("created_at")
        return Event(aggregate_type, aggregate_id, event_type, payload, options.get("headers"),
                     options.get("topic"), content_type, event_id, created_at)

    # -- reading ---------------------------------------------------------------------------------

    def decode(self, message: Any, protobuf_type: Any = None) -> Any:
        """The value of a consumed `outbox.consumer.Message` written by these formats: a dict
        for Avro and JSON Schema (checked against the writer's schema from the registry), an
        instance of `protobuf_type` for Protobuf."""
        serialization = importlib.import_module("confluent_kafka.serialization")
        context = serialization.SerializationContext(message.topic,
                                                     serialization.MessageField.VALUE)
        content_type = message.content_type
        if content_type == AVRO_CONTENT_TYPE:
            deserializer = self._deserializer("avro", None, lambda module: (
                module.AvroDeserializer(self.client)))
        elif content_type == JSON_SCHEMA_CONTENT_TYPE:
            deserializer = self._deserializer("json", None, lambda module: (
                module.JSONDeserializer(None, schema_registry_client=self.client)))
        elif content_type == PROTOBUF_CONTENT_TYPE:
            if protobuf_type is None:
                raise ConfigurationError("decoding Protobuf needs protobuf_type=")
            deserializer = self._deserializer("protobuf", protobuf_type, lambda module: (
                module.ProtobufDeserializer(protobuf_type, {"use.deprecated.format": False},
                                            schema_registry_client=self.client)))
        else:
            raise InvalidEventError(
                f"content type {content_type!r} is not a Schema Registry format")
        return deserializer(message.payload, context)

    def _deserializer(self, kind: str, message_type: Any, make: Any) -> Any:
        key = (kind, message_type)
        deserializer = self._deserializers.get(key)
        if deserializer is None:
            deserializer = make(_module(f".{kind}_schema" if kind == "json" else f".{kind}"))
            self._deserializers[key] = deserializer
        return deserializer

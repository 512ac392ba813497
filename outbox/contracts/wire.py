"""The Confluent wire format's names and framing, without its libraries: what the consumer's
typed handlers need to read a JSON Schema payload (`outbox.contracts.schema_registry` writes it).

A framed payload is a zero magic byte, the schema id (4 bytes, big-endian), then the body:
Avro binary, Protobuf (after message indexes) or, for JSON Schema, the JSON text itself.
"""

from __future__ import annotations

from outbox.contracts.shapes import EventValidationError

AVRO_CONTENT_TYPE = "application/vnd.confluent.avro"
JSON_SCHEMA_CONTENT_TYPE = "application/vnd.confluent.jsonschema+json"
PROTOBUF_CONTENT_TYPE = "application/vnd.confluent.protobuf"
CONTENT_TYPES = frozenset({AVRO_CONTENT_TYPE, JSON_SCHEMA_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE})

MAGIC_BYTE = 0
HEADER_SIZE = 5


def schema_id(payload: bytes) -> int:
    """The registry's id of the schema `payload` was written with."""
    if len(payload) < HEADER_SIZE or payload[0] != MAGIC_BYTE:
        raise EventValidationError(
            "the payload is not in the Confluent wire format (magic byte 0 and a schema id)")
    return int.from_bytes(payload[1:HEADER_SIZE], "big")


def json_body(payload: bytes) -> bytes:
    """The JSON text of a JSON Schema payload in the wire format."""
    schema_id(payload)
    return payload[HEADER_SIZE:]

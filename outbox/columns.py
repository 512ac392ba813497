"""Which columns of the outbox table hold which part of an event (native or Debezium layout)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from outbox.errors import ConfigurationError
from outbox.event import BYTES_CONTENT_TYPE, JSON_CONTENT_TYPE, TEXT_CONTENT_TYPE
from outbox.identifiers import check_identifier

PayloadType = Literal["bytea", "jsonb", "json", "text"]

# The table layouts a relay can be told to read (`--columns`, OUTBOX_COLUMNS).
LAYOUTS: tuple[str, ...] = ("native", "debezium")


@dataclass(frozen=True)
class ColumnMapping:
    """Column names of the outbox table. `None` means the table has no such column.

    The default is the table created by `outbox migrate`. `ColumnMapping.debezium()` maps the
    table that Debezium's Outbox Event Router reads (`id, aggregatetype, aggregateid, type,
    payload`), so a team can switch relays without migrating data.
    """

    id: str = "id"
    aggregate_type: str = "aggregate_type"
    aggregate_id: str = "aggregate_id"
    event_type: str = "event_type"
    payload: str = "payload"
    payload_type: PayloadType = "bytea"
    topic: str | None = "topic"
    content_type: str | None = "content_type"
    headers: str | None = "headers"
    created_at: str | None = "created_at"

    @classmethod
    def debezium(cls, payload_type: PayloadType = "jsonb") -> ColumnMapping:
        return cls(
            id="id",
            aggregate_type="aggregatetype",
            aggregate_id="aggregateid",
            event_type="type",
            payload="payload",
            payload_type=payload_type,
            topic=None,
            content_type=None,
            headers=None,
            created_at=None,
        )

    def __post_init__(self) -> None:
        if self.payload_type not in ("bytea", "jsonb", "json", "text"):
            raise ConfigurationError(
                f"columns.payload_type={self.payload_type!r}: choose bytea, jsonb, json or text"
            )
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "payload_type" and value is not None:
                check_identifier(value, f"columns.{item.name}")

    @classmethod
    def for_layout(cls, layout: str, payload_type: PayloadType = "jsonb") -> ColumnMapping:
        """The mapping of a layout named in configuration; `payload_type` applies to Debezium
        tables only (a native table's payload is always bytea)."""
        if layout == "native":
            return cls()
        if layout == "debezium":
            return cls.debezium(payload_type)
        raise ConfigurationError(f"columns={layout!r}: choose one of {', '.join(LAYOUTS)}")

    @property
    def is_native(self) -> bool:
        return self == ColumnMapping()

    @property
    def layout(self) -> str | None:
        """The name of this mapping's layout in LAYOUTS; None for a custom mapping."""
        if self.is_native:
            return "native"
        return "debezium" if self == ColumnMapping.debezium(self.payload_type) else None

    @property
    def default_content_type(self) -> str:
        """The content type of events of a table without a content_type column: what its
        payload type holds (the WAL relay decides the same from the column's type OID)."""
        if self.payload_type in ("jsonb", "json"):
            return JSON_CONTENT_TYPE
        return BYTES_CONTENT_TYPE if self.payload_type == "bytea" else TEXT_CONTENT_TYPE

    def present(self) -> dict[str, str]:
        """Event field -> column, for the columns this table has, in a stable order."""
        names = ("id", "aggregate_type", "aggregate_id", "event_type", "topic", "payload",
                 "content_type", "headers", "created_at")
        return {name: col for name in names if (col := getattr(self, name)) is not None}

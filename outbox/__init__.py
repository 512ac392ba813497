"""outbox-relay: record domain events in your transaction; a relay publishes them to Kafka."""

from __future__ import annotations

from outbox import commands
from outbox.columns import ColumnMapping
from outbox.contracts.registry import EventRegistry, event_type
from outbox.contracts.shapes import EventValidationError
from outbox.errors import (
    AtomicityError,
    ConfigurationError,
    InvalidEventError,
    OutboxError,
    PayloadTooLargeError,
    SchemaMissingError,
    UnsupportedTargetError,
)
from outbox.event import Event
from outbox.record import OutboxRecord
from outbox.writer import Outbox, default_outbox, publish

__all__ = [
    "AtomicityError",
    "ColumnMapping",
    "ConfigurationError",
    "Event",
    "EventRegistry",
    "EventValidationError",
    "InvalidEventError",
    "Outbox",
    "OutboxError",
    "OutboxRecord",
    "PayloadTooLargeError",
    "SchemaMissingError",
    "UnsupportedTargetError",
    "aggregates",
    "commands",
    "default_outbox",
    "event_type",
    "publish",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `outbox.aggregates` needs SQLAlchemy: load it on first use, not with the package.
    if name == "aggregates":
        import importlib

        return importlib.import_module("outbox.aggregates")
    raise AttributeError(f"module 'outbox' has no attribute {name!r}")

"""The relay's settings: one validated object, built from the CLI, OUTBOX_* variables or a file."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from outbox.columns import ColumnMapping
from outbox.conninfo import redact
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from relay import sources
from relay.sinks.kafka.sink import PublisherConfig

SOURCES = sources.NAMES

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


_SIZE = re.compile(r"^\s*(\d+)\s*(B|kB|KB|MB|GB|TB)?\s*$")
# As PostgreSQL counts its memory and WAL settings: 1 kB = 1024 bytes.
_SIZE_UNITS = {None: 1, "B": 1, "kB": 1 << 10, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30,
               "TB": 1 << 40}


def parse_size(text: str, setting: str) -> int:
    """`512MB`, `2GB`, `64kB` (1024-based, as PostgreSQL's settings; a bare number is bytes)."""
    match = _SIZE.match(str(text))
    if not match or int(match[1]) <= 0:
        raise ConfigurationError(f"{setting}={text!r} is not a size like 64kB, 512MB, 2GB")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def parse_duration(text: str, setting: str) -> dt.timedelta:
    """`500ms`, `30s`, `5m`, `2h`, `7d` (a bare number is seconds)."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigurationError(f"{setting}={text!r} is not a duration like 30s, 5m, 7d")
    return dt.timedelta(seconds=float(match[1]) * _UNITS[match[2]])


SECRET_FIELDS = ("db_url", "mongo_url")

# A console token guards writes over HTTP: long enough not to be guessed.
MIN_CONSOLE_TOKEN = 16


def check_console_token(token: str, metrics_port: int | None) -> None:
    if metrics_port is None:
        raise ConfigurationError(
            "console_token needs metrics_port: the console is served on the metrics port")
    if len(token) < MIN_CONSOLE_TOKEN or token != token.strip():
        raise ConfigurationError(
            f"console_token must be at least {MIN_CONSOLE_TOKEN} characters, without "
            "surrounding blanks (e.g. `openssl rand -hex 24`)")


def read_token_file(path: str, setting: str) -> str:
    """A secret kept in a file (a mounted secret), stripped as `OUTBOX_*_FILE` secrets are
    (outbox/config_files.py)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"{setting}={path!r} cannot be read: {exc.strerror}") from exc
    if not token:
        raise ConfigurationError(f"{setting}={path!r} is empty")
    return token


@dataclass(frozen=True)
class RelaySettings:
    source: str
    kafka_bootstrap: str
    db_url: str | None = field(default=None, repr=False)  # secrets: see redacted()
    mongo_url: str | None = field(default=None, repr=False)
    collections: tuple[str, ...] = ()
    schema: str = "public"
    table: str = "outbox"
    # The outbox table's layout: "native" (outbox migrate) or "debezium" (Debezium's table).
    columns: str = "native"
    topic_template: str = "{aggregate_type}"
    kafka_settings: dict[str, str] = field(default_factory=dict)
    allow_unsafe_kafka_settings: bool = False
    batch_size: int | None = None  # None: the source's own default
    poll_interval: float = 1.0
    keep_published: dt.timedelta | None = None
    slot: str = "outbox_relay"
    publication: str = "outbox_relay"
    message_prefix: str = "outbox"
    table_less: bool = False  # postgres-wal: events only as messages, no outbox table
    # postgres-wal: what a lost slot does: "stop" the relay, or "recover" it from the table.
    on_slot_loss: str = "stop"
    # postgres-wal: WAL the slot may retain (bytes) before the relay reports it; with
    # on_slot_loss="recover" it then drops its slot and recovers (relay/wal/budget.py).
    max_slot_wal: int | None = None
    shutdown_timeout: float = 30.0
    # postgres-poll on a sharded outbox: one of several relays, each publishing some shards;
    # a relay's shards move to the others within about the lease once it is gone.
    shards: bool = False
    shard_lease: float = 10.0
    # Every message gets this header naming the relay run that published it (host:pid:run).
    relay_id_header: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # /readyz: a relay with work in flight and no acknowledgement for this long is stalled.
    stall_timeout: float = 60.0
    # The console on the metrics port redrives parked events only for requests with this token.
    console_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigurationError(f"source={self.source!r}: choose one of {', '.join(SOURCES)}")
        # What is a source's own (its connection, its settings) is checked by its registry
        # entry (relay/sources.py); the rest here.
        source = sources.get(self.source)
        source.require(self)
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigurationError(f"batch_size={self.batch_size} must be positive")
        if self.shutdown_timeout <= 0:
            raise ConfigurationError("shutdown_timeout must be positive")
        if self.shard_lease <= 0:
            raise ConfigurationError(f"shard_lease={self.shard_lease} must be positive")
        if self.stall_timeout <= 0:
            raise ConfigurationError(f"stall_timeout={self.stall_timeout} must be positive")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigurationError(f"metrics_port={self.metrics_port} is not a TCP port")
        if self.console_token is not None:
            check_console_token(self.console_token, self.metrics_port)
        SchemaNames(self.schema, self.table)  # validates the names
        ColumnMapping.for_layout(self.columns)  # validates the layout's name
        source.refuse_others(self)
        self.publisher()  # validates the topic template and the Kafka settings

    @property
    def names(self) -> SchemaNames:
        return SchemaNames(self.schema, self.table)

    @property
    def column_mapping(self) -> ColumnMapping:
        """The columns of the outbox table; a Debezium payload's type is read from the table
        by the polling relay at start-up (the WAL relay reads it from the stream)."""
        return ColumnMapping.for_layout(self.columns)

    def publisher(self, defaults: Mapping[str, str] | None = None) -> PublisherConfig:
        """The Kafka side; `defaults` are librdkafka settings of this source that the user's
        own `kafka_settings` override."""
        config = PublisherConfig(
            bootstrap_servers=self.kafka_bootstrap,
            topic_template=self.topic_template,
            kafka_settings={**(defaults or {}), **self.kafka_settings},
            allow_unsafe_kafka_settings=self.allow_unsafe_kafka_settings,
            relay_id_header=self.relay_id_header,
        )
        config.producer_settings()
        return config

    def redacted(self) -> dict[str, Any]:
        """The effective settings with secrets hidden, for logs and --print-config."""
        shown: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in SECRET_FIELDS and value:
                value = redact(str(value))
            elif item.name == "console_token" and value:
                value = "***"
            elif item.name == "kafka_settings":
                value = {k: ("***" if "password" in k or "secret" in k else v)
                         for k, v in value.items()}
            elif isinstance(value, dt.timedelta):
                value = f"{value.total_seconds():g}s"
            elif isinstance(value, tuple):
                value = list(value)
            shown[item.name] = value
        return shown

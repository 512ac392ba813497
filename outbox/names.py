"""Every database object name derived from the configured schema and outbox table, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from outbox.errors import ConfigurationError
from outbox.identifiers import check_identifier

# Derived names append at most this many characters to the table name.
_LONGEST_SUFFIX = len("_notify_trigger")
# The only name derived from the inbox table (its sequence numbers).
_INBOX_SUFFIX = "_sequence"


@dataclass(frozen=True)
class SchemaNames:
    schema: str = "public"
    table: str = "outbox"
    inbox_table: str = "outbox_inbox"

    def __post_init__(self) -> None:
        check_identifier(self.schema, "schema")
        check_identifier(self.table, "table")
        check_identifier(self.inbox_table, "inbox_table")
        if len(self.table) + _LONGEST_SUFFIX > 63:
            raise ConfigurationError(
                f"table={self.table!r} is too long: at most {63 - _LONGEST_SUFFIX} characters, "
                "so that the names derived from it fit PostgreSQL's 63-byte limit"
            )
        if len(self.inbox_table) + len(_INBOX_SUFFIX) > 63:
            raise ConfigurationError(
                f"inbox_table={self.inbox_table!r} is too long: at most "
                f"{63 - len(_INBOX_SUFFIX)} characters, so that {self.inbox_table}"
                f"{_INBOX_SUFFIX} fits PostgreSQL's 63-byte limit"
            )

    @property
    def parked_table(self) -> str:
        return f"{self.table}_parked"

    @property
    def position_table(self) -> str:
        """The WAL relay's acknowledged position per slot, and its recoveries."""
        return f"{self.table}_relay_position"

    @property
    def sequence_table(self) -> str:
        """The writer's last sequence number per aggregate (Outbox(sequence=True))."""
        return f"{self.table}_sequence"

    @property
    def inbox_sequence_table(self) -> str:
        """The consumer's last applied sequence number per aggregate (ordering="sequence")."""
        return f"{self.inbox_table}_sequence"

    @property
    def shards_table(self) -> str:
        """A sharded outbox's shards, one row each (`outbox migrate up --shards N`)."""
        return f"{self.table}_shards"

    @property
    def channel(self) -> str:
        """LISTEN/NOTIFY channel that wakes the polling relay."""
        return f"{self.table}_{self.schema}"[:63]

    @property
    def migrations_table(self) -> str:
        return "outbox_migrations"

    def identifiers(self) -> dict[str, sql.Composable]:
        """Placeholders usable in migration files and queries."""
        return {
            "schema": sql.Identifier(self.schema),
            "table": sql.Identifier(self.table),
            "parked_table": sql.Identifier(self.parked_table),
            "position_table": sql.Identifier(self.position_table),
            "migrations_table": sql.Identifier(self.migrations_table),
            "inbox_table": sql.Identifier(self.inbox_table),
            "sequence_table": sql.Identifier(self.sequence_table),
            "inbox_sequence_table": sql.Identifier(self.inbox_sequence_table),
            "pending_index": sql.Identifier(f"{self.table}_pending_idx"),
            "txid_index": sql.Identifier(f"{self.table}_txid_idx"),
            "shards_table": sql.Identifier(self.shards_table),
            "shard_index": sql.Identifier(f"{self.table}_shard_idx"),
            "position_key": sql.Identifier(f"{self.table}_position_key"),
            "notify_function": sql.Identifier(f"{self.table}_notify"),
            "notify_trigger": sql.Identifier(f"{self.table}_notify_trigger"),
            "channel": sql.Literal(self.channel),
            "channel_identifier": sql.Identifier(self.channel),
        }

    def qualified(self, name: str) -> sql.Identifier:
        """`"schema"."name"`, quoted."""
        return sql.Identifier(self.schema, name)

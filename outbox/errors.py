"""The exception tree of outbox-relay: one root, the class docstring is the default message."""

from __future__ import annotations


class OutboxError(Exception):
    """An outbox-relay operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidEventError(OutboxError, ValueError):
    """The event is not valid; nothing was written."""


class PayloadTooLargeError(InvalidEventError):
    """The event's payload is larger than the configured maximum; nothing was written."""


class ConfigurationError(OutboxError, ValueError):
    """A setting is invalid."""


class AtomicityError(OutboxError):
    """The connection is not inside a transaction, so events would not be atomic with the change.

    Open a transaction (psycopg: `with conn.transaction():`, or leave autocommit off) or pass
    `allow_autocommit=True` to the Outbox if you accept losing atomicity.
    """


class SchemaMissingError(OutboxError):
    """The outbox table does not exist in this database: run `outbox migrate up --db URL` first."""


class UnsupportedTargetError(OutboxError, TypeError):
    """`publish` needs a SQLAlchemy Session/Connection or a psycopg Connection (sync or async)."""


class MigrationError(OutboxError):
    """Applying or reading the outbox migrations failed."""


class MissingExtraError(OutboxError, ImportError):
    """A feature needs an optional dependency that is not installed."""

"""The consumer's branch of the outbox-relay exception tree."""

from __future__ import annotations

from outbox.errors import OutboxError, SchemaMissingError


class ConsumerError(OutboxError):
    """The idempotent consumer failed."""


class KafkaConsumeError(ConsumerError):
    """Kafka reported an error the consumer cannot go on after."""


class InboxMissingError(ConsumerError, SchemaMissingError):
    """The inbox (dedup) table does not exist in this database: run `outbox migrate up --db URL`."""


class InboxStoreError(ConsumerError):
    """The inbox database failed in a way that retrying will not cure; nothing was committed."""


class HandlerExhaustedError(ConsumerError):
    """A handler failed on every try and the consumer is configured to stop rather than
    dead-letter; the message's offset was not committed."""


class HandlerCommitError(ConsumerError):
    """A handler must not commit: the consumer commits the handler's writes together with the
    dedup row (psycopg: conn.commit() is refused inside the consumer's transaction too)."""


class ReplayError(ConsumerError):
    """Replaying dead letters to their original topic failed."""


class RejectMessage(ConsumerError):
    """The handler refused the message for good: it is dead-lettered at once, without retries."""

"""The MongoDB inbox store (a dedup document with a unique index, in the handler's
transaction), where it has always been imported from: it is written once, with the others, in
`aio_stores` (`AsyncMongoStore`) and generated into `stores` (`MongoStore`)."""

from __future__ import annotations

from outbox.consumer.store_rules import (
    DEFAULT_INBOX_COLLECTION,
    ConcurrentClaim,
    as_uuid,
    mongo_transient,
)
from outbox.consumer.stores import MongoStore

__all__ = ["DEFAULT_INBOX_COLLECTION", "ConcurrentClaim", "MongoStore", "as_uuid",
           "mongo_transient"]

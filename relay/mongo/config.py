"""Configuration of the MongoDB relay sources: one validated object, defaults documented."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from outbox.conninfo import redact
from outbox.errors import ConfigurationError
from outbox.mongo import DEFAULT_COLLECTION, DEFAULT_FIELD, check_collection_name, check_field


@dataclass(frozen=True)
class MongoRelayConfig:
    """What a MongoDB relay reads, and how.

    url: MongoDB URL naming the database (`mongodb://host/db?replicaSet=rs`).
    collections: the collections whose documents embed pending events in `field`.
    outbox_collection: the outbox collection of `outbox.mongo.publish` (read as well; it may
        not exist).
    parked_collection: where events that can never be published go, with the reason.
    state_collection: the relay's lease and the change stream's resume token.
    batch_size: at most this many events sent per collection and page read.
    page_documents: at most this many documents read per query (pages are sized to hold
        about batch_size events, by the events per document seen so far).
    max_in_flight: events sent and not yet acknowledged by Kafka; reading stops above it, so
        memory stays bounded while the broker is slow or away.
    poll_interval: mongo-poll: pause after a pass over the collections found nothing new;
        mongo-stream: longest server-side wait for a change.
    ack_interval: delivered events are pulled from their documents at least this often.
    token_interval: an idle change stream's resume token is refreshed at least this often,
        so it does not fall out of the oplog while nothing is written.
    lease_ttl: a leader that has not renewed its lease for this long is replaced by a
        standby; it renews every third of it.
    standby_interval: how often a standby checks the lease.
    shutdown_timeout: on stop, wait this long for Kafka's outstanding delivery reports.
    server_timeout: server selection / connection timeout, seconds.
    create_indexes: create the pending-events index and the outbox collection at start-up
        (needs the createIndex privilege; without it the relay only warns).
    """

    url: str = field(repr=False)  # may hold the password
    collections: tuple[str, ...]
    field: str = DEFAULT_FIELD
    outbox_collection: str = DEFAULT_COLLECTION
    parked_collection: str = "outbox_parked"
    state_collection: str = "outbox_relay_state"
    batch_size: int = 5000
    page_documents: int = 5000
    max_in_flight: int = 20_000
    poll_interval: float = 1.0
    ack_interval: float = 0.05
    token_interval: float = 60.0
    lease_ttl: float = 10.0
    standby_interval: float = 2.0
    shutdown_timeout: float = 30.0
    server_timeout: float = 10.0
    create_indexes: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "collections", tuple(self.collections))
        self.database  # noqa: B018 - validates the URL now
        check_field(self.field)
        if not self.collections:
            raise ConfigurationError("collections is empty: name the collections to relay")
        for name in self.collections:
            check_collection_name(name, "collections")
        if len(set(self.collections)) != len(self.collections):
            raise ConfigurationError(f"collections={list(self.collections)} has duplicates")
        special = {
            "outbox_collection": self.outbox_collection,
            "parked_collection": self.parked_collection,
            "state_collection": self.state_collection,
        }
        for setting, name in special.items():
            check_collection_name(name, setting)
            if name in self.collections:
                raise ConfigurationError(
                    f"{setting}={name!r} is also listed in collections; the relay reads "
                    "embedded events from collections and writes its own documents there"
                )
        if len(set(special.values())) != len(special):
            raise ConfigurationError(f"{', '.join(special)} must be three different collections")
        checks = {
            "batch_size": self.batch_size > 0,
            "page_documents": self.page_documents > 0,
            "max_in_flight": self.max_in_flight >= self.batch_size,
            "poll_interval": self.poll_interval > 0,
            "ack_interval": self.ack_interval >= 0,
            "token_interval": self.token_interval > 0,
            "lease_ttl": self.lease_ttl > 0,
            "standby_interval": self.standby_interval > 0,
            "shutdown_timeout": self.shutdown_timeout > 0,
            "server_timeout": self.server_timeout > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigurationError(
                    f"{name}={getattr(self, name)!r} is out of range"
                    + (" (must be >= batch_size)" if name == "max_in_flight" else "")
                )

    @property
    def database(self) -> str:
        """The database named by the URL's path."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("mongodb", "mongodb+srv"):
            raise ConfigurationError(
                f"mongo_url={redact(self.url)!r} is not a mongodb:// or mongodb+srv:// URL")
        name = urllib.parse.unquote(parts.path.lstrip("/"))
        if not name or any(c in name for c in '/\\. "$\x00'):
            raise ConfigurationError(
                f"mongo_url={redact(self.url)!r} names no valid database: put it in the path, "
                "e.g. mongodb://host:27017/shop?replicaSet=rs0"
            )
        return name

    @property
    def marker_field(self) -> str:
        """Set by every acknowledgement `$pull`: the change stream recognises the relay's own
        writes by it and skips them (their list shows entries that are old, not new)."""
        return f"{self.field}_relayed_at"

    @property
    def scope(self) -> str:
        """What one active relay owns: the database's collections and the field it reads."""
        return f"{','.join(sorted(self.collections))}|{self.outbox_collection}|{self.field}"

    @property
    def lease_id(self) -> str:
        return f"lease:{self.scope}"

    @property
    def token_id(self) -> str:
        return f"resume-token:{self.scope}"

    @property
    def watched(self) -> tuple[str, ...]:
        """Every collection the sources read: the embedded ones and the outbox collection."""
        return (*self.collections, self.outbox_collection)

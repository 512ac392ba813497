"""How the daemon builds the MongoDB sources from the relay's settings (relay/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

from relay import sources
from relay.daemon import Relay
from relay.mongo import (
    MongoPollRelay,
    MongoRelayConfig,
    MongoStreamRelay,
    check_source,
    lease_owner,
    mongo_gauges,
)
from relay.settings import RelaySettings
from relay.stats import RelayStats


def config(settings: RelaySettings) -> MongoRelayConfig:
    """mongo-poll and mongo-stream: one configuration, two ways of reading."""
    assert settings.mongo_url is not None
    return MongoRelayConfig(
        url=settings.mongo_url,
        collections=settings.collections,
        # --table names the outbox collection of outbox.mongo.publish for these sources.
        outbox_collection=settings.table,
        batch_size=settings.batch_size or MongoRelayConfig.batch_size,
        max_in_flight=max(20_000, 4 * (settings.batch_size or MongoRelayConfig.batch_size)),
        poll_interval=settings.poll_interval,
        shutdown_timeout=settings.shutdown_timeout,
    )


def check(config: MongoRelayConfig, source: sources.Source) -> MongoRelayConfig:
    """The server (a replica set for mongo-stream), the collections and the indexes."""
    check_source(config, stream=source.name == "mongo-stream")
    return config


def gauges(config: MongoRelayConfig) -> sources.Gauges:
    return mongo_gauges(config)


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    source = sources.get(settings.source)
    mongo, publisher, limits = source.prepare(settings, stats)
    streaming = source.name == "mongo-stream"
    mongo_relay = MongoStreamRelay if streaming else MongoPollRelay
    owner = lease_owner()
    return lambda: mongo_relay(mongo, publisher, stats, owner=owner, topic_limits=limits)

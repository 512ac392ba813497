"""How the daemon builds the MongoDB sources from the relay's settings (relay/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

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
from relay.sinks.kafka.sink import topic_limits_for
from relay.stats import RelayStats


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    """mongo-poll and mongo-stream: one configuration, two ways of reading."""
    assert settings.mongo_url is not None
    mongo = MongoRelayConfig(
        url=settings.mongo_url,
        collections=settings.collections,
        # --table names the outbox collection of outbox.mongo.publish for these sources.
        outbox_collection=settings.table,
        batch_size=settings.batch_size or MongoRelayConfig.batch_size,
        max_in_flight=max(20_000, 4 * (settings.batch_size or MongoRelayConfig.batch_size)),
        poll_interval=settings.poll_interval,
        shutdown_timeout=settings.shutdown_timeout,
    )
    streaming = settings.source == "mongo-stream"
    check_source(mongo, stream=streaming)
    publisher = settings.publisher()
    stats.gauges.update(mongo_gauges(mongo))
    mongo_relay = MongoStreamRelay if streaming else MongoPollRelay
    owner = lease_owner()
    limits = topic_limits_for(publisher)  # kept across the relay's restarts
    return lambda: mongo_relay(mongo, publisher, stats, owner=owner, topic_limits=limits)

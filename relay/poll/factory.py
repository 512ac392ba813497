"""How the daemon builds the polling source from the relay's settings (relay/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

from relay.daemon import Relay
from relay.poll.relay import PollConfig, check_schema, poll_gauges, polling_relay
from relay.settings import RelaySettings
from relay.sinks.kafka.sink import topic_limits_for
from relay.stats import RelayStats


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    assert settings.db_url is not None
    config = PollConfig(
        db_url=settings.db_url,
        names=settings.names,
        batch_size=settings.batch_size or PollConfig.batch_size,
        poll_interval=settings.poll_interval,
        keep_published=settings.keep_published,
        shutdown_timeout=settings.shutdown_timeout,
        columns=settings.column_mapping,
    )
    config = check_schema(config)
    publisher = settings.publisher()
    stats.gauges.update(poll_gauges(config))
    limits = topic_limits_for(publisher)  # kept across the relay's restarts
    return lambda: polling_relay(config, publisher, stats, limits)

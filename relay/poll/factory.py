"""How the daemon builds the polling source from the relay's settings (relay/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

from relay import sources
from relay.daemon import Relay
from relay.poll.relay import (
    PollConfig,
    ShardedRelay,
    check_schema,
    poll_gauges,
    polling_relay,
)
from relay.published import warn_topic_not_kept
from relay.settings import RelaySettings
from relay.stats import RelayStats


def config(settings: RelaySettings) -> PollConfig:
    assert settings.db_url is not None
    return PollConfig(
        db_url=settings.db_url,
        names=settings.names,
        batch_size=settings.batch_size or PollConfig.batch_size,
        poll_interval=settings.poll_interval,
        keep_published=settings.keep_published,
        topic_template=settings.topic_template,
        shutdown_timeout=settings.shutdown_timeout,
        columns=settings.column_mapping,
        sharded=settings.shards,
        shard_lease=settings.shard_lease,
    )


def check(config: PollConfig, source: sources.Source) -> PollConfig:
    """The tables, the role's privileges, and the type of a Debezium table's payload."""
    checked = check_schema(config)
    warn_topic_not_kept(checked.topic_template, checked.columns, checked.keep_published)
    return checked


def gauges(config: PollConfig) -> sources.Gauges:
    return poll_gauges(config)


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    config, publisher, limits = sources.get(settings.source).prepare(settings, stats)
    if config.sharded:
        return lambda: ShardedRelay(config, publisher, stats, limits)
    return lambda: polling_relay(config, publisher, stats, limits)

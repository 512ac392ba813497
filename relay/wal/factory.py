"""How the daemon builds the WAL source from the relay's settings (relay/sources.py)."""

from __future__ import annotations

from collections.abc import Callable

from relay import sources
from relay.daemon import Relay
from relay.published import warn_topic_not_kept
from relay.settings import RelaySettings
from relay.sources import WAL_KAFKA_DEFAULTS
from relay.stats import RelayStats
from relay.wal.position import Remembered
from relay.wal.relay import WalRelayConfig, check_setup, wal_gauges, wal_relay
from relay.wal.source import WalSourceConfig

__all__ = ["WAL_KAFKA_DEFAULTS", "check", "config", "gauges", "relay_factory"]


def config(settings: RelaySettings) -> WalRelayConfig:
    assert settings.db_url is not None
    return WalRelayConfig(
        db_url=settings.db_url,
        source=WalSourceConfig(
            slot=settings.slot, publication=settings.publication, schema=settings.schema,
            table=None if settings.table_less else settings.table,
            columns=settings.column_mapping,
            message_prefix=settings.message_prefix,
            # Confirm the slot every second: after a crash, at most about a second of events is
            # sent again (besides what was in flight).
            status_interval=1.0),
        names=settings.names,
        shutdown_timeout=settings.shutdown_timeout,
        keep_published=settings.keep_published,
        topic_template=settings.topic_template,
        on_slot_loss=settings.on_slot_loss,
        max_slot_wal=settings.max_slot_wal,
    )


def check(config: WalRelayConfig, source: sources.Source) -> WalRelayConfig:
    """The slot, the publication, the tables and the role's privileges."""
    check_setup(config)
    if config.source.table is not None:
        warn_topic_not_kept(config.topic_template, config.source.columns, config.keep_published)
    return config


def gauges(config: WalRelayConfig) -> sources.Gauges:
    return wal_gauges(config)


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    wal, publisher, limits = sources.get(settings.source).prepare(settings, stats)
    # What this process saw acknowledged, across the supervisor's restarts of the relay.
    remembered = Remembered()
    if wal.on_slot_loss == "recover":
        from relay.wal.recovery import HealingRelay

        return lambda: HealingRelay(wal, publisher, stats, limits, remembered)
    return lambda: wal_relay(wal, publisher, stats, limits, remembered)

"""Builds the configured relay and runs it as a daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

from outbox.errors import OutboxError
from relay.daemon import Relay, stop_on_signals, supervise
from relay.errors import FatalRelayError, RetryableError
from relay.metrics import MetricsServer
from relay.settings import RelaySettings
from relay.stats import RelayStats

log = logging.getLogger(__name__)


# The WAL relay drains a backlog at up to ~90,000 events/s: waiting 5 ms (not the default 1) to
# fill batches sends it in fewer, larger produce requests, cutting the CPU librdkafka and the
# broker spend per event (relay 13.9 -> 12.1 us/event, drain +15% on a 2-core machine shared
# with PostgreSQL and Kafka). It adds up to 5 ms of latency: p99 5.7 ms at 1,000 events/s.
WAL_KAFKA_DEFAULTS = {"linger.ms": "5"}


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    """Check the source once (fail fast on a wrong setup) and return a maker of relays."""
    if settings.source == "postgres-poll":
        from relay.poll.relay import PollConfig, PollingRelay, check_schema, poll_gauges

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
        return lambda: PollingRelay(config, publisher, stats)
    if settings.source == "postgres-wal":
        from relay.wal.relay import WalRelay, WalRelayConfig, check_setup, wal_gauges
        from relay.wal.source import WalSourceConfig

        assert settings.db_url is not None
        wal = WalRelayConfig(
            db_url=settings.db_url,
            source=WalSourceConfig(
                slot=settings.slot, publication=settings.publication, schema=settings.schema,
                table=None if settings.table_less else settings.table,
                columns=settings.column_mapping,
                message_prefix=settings.message_prefix,
                # Confirm the slot every second: after a crash, at most about a second of
                # events is sent again (besides what was in flight).
                status_interval=1.0),
            names=settings.names,
            shutdown_timeout=settings.shutdown_timeout,
            keep_published=settings.keep_published,
        )
        check_setup(wal)
        publisher = settings.publisher(WAL_KAFKA_DEFAULTS)
        stats.gauges.update(wal_gauges(wal))
        return lambda: WalRelay(wal, publisher, stats)
    if settings.source in ("mongo-poll", "mongo-stream"):
        from relay.mongo import (
            MongoPollRelay,
            MongoRelayConfig,
            MongoStreamRelay,
            check_source,
            lease_owner,
            mongo_gauges,
        )

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
        return lambda: mongo_relay(mongo, publisher, stats, owner=owner)
    raise FatalRelayError(f"source {settings.source!r} is not available in this version")


# The relay's hot path makes short-lived objects without reference cycles (records, closures,
# tuples), which reference counting frees; with CPython's default threshold (700) the cyclic
# collector still ran every few dozen events and scanned every event in flight: a tenth of a
# WAL drain's time. Collections stay on, just rarer.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """Make cyclic garbage collection rare; what start-up loaded is never scanned again.

    For a process that runs the relay and nothing else (the `outbox relay` command).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(settings: RelaySettings, stop: threading.Event | None = None) -> None:
    """Run until stopped. Raises OutboxError when the relay cannot start or must stop."""
    stop = stop or threading.Event()
    stats = RelayStats(source=settings.source)
    log.info("relay starting", extra={"event": "relay_starting", "settings": settings.redacted()})
    try:
        factory = relay_factory(settings, stats)
    except RetryableError as exc:
        # At start-up an unreachable source is a configuration problem until proven otherwise.
        raise FatalRelayError(f"cannot start: {exc}") from exc
    server = None
    if settings.metrics_port is not None:
        server = MetricsServer(stats, settings.metrics_port, settings.metrics_host,
                               stall_timeout=settings.stall_timeout).start()
    try:
        with stop_on_signals(stop):
            supervise(factory, stop, stats=stats)
    finally:
        if server is not None:
            server.stop()
    log.info("relay stopped", extra={"event": "relay_exit"})


__all__ = ["OutboxError", "run"]

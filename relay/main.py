"""Builds the configured relay and runs it as a daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

from outbox.errors import OutboxError
from relay import sources
from relay.daemon import Relay, stop_on_signals, supervise
from relay.errors import FatalRelayError, RelayError
from relay.metrics import MetricsServer
from relay.settings import RelaySettings
from relay.stats import RelayStats

log = logging.getLogger(__name__)


def relay_factory(settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
    """Check the source once (fail fast on a wrong setup) and return a maker of relays."""
    return sources.get(settings.source).relay_factory(settings, stats)


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
    except RelayError as exc:
        if not exc.restart:
            raise
        # At start-up an unreachable source is a configuration problem until proven otherwise.
        raise FatalRelayError(f"cannot start: {exc}") from exc
    server = None
    if settings.metrics_port is not None:
        from relay.console.app import console_for

        server = MetricsServer(stats, settings.metrics_port, settings.metrics_host,
                               stall_timeout=settings.stall_timeout,
                               console=console_for(settings, stats)).start()
    try:
        with stop_on_signals(stop):
            supervise(factory, stop, stats=stats)
    finally:
        if server is not None:
            server.stop()
    log.info("relay stopped", extra={"event": "relay_exit"})


__all__ = ["OutboxError", "run"]

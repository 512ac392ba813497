"""Runs a relay as a daemon: signal handling, restart with backoff, clean stop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol

from outbox.conninfo import redact
from relay.errors import RelayError
from relay.stats import RelayStats

log = logging.getLogger(__name__)


class Relay(Protocol):
    def run(self, stop: threading.Event) -> None:
        """Publish until `stop` is set; raise a RelayError whose `restart` says what follows."""


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop`; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"event": "stop_requested", "signal": signum})
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def supervise(
    make_relay: Callable[[], Relay],
    stop: threading.Event,
    *,
    stats: RelayStats | None = None,
    initial_backoff: float = 0.5,
    max_backoff: float = 30.0,
    healthy_after: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run relays one after another until `stop`: an error that declares `restart` restarts
    after a pause that doubles up to `max_backoff`, and starts again from `initial_backoff`
    after a relay that ran `healthy_after` seconds (a failure a day apart is not a crash loop);
    any other error ends the daemon."""
    backoff = initial_backoff
    while not stop.is_set():
        relay = make_relay()
        started = clock()
        try:
            relay.run(stop)
            return
        except RelayError as exc:
            if not exc.restart:
                raise
            if clock() - started >= healthy_after:
                backoff = initial_backoff
            if stats is not None:
                stats.restarts += 1
            log.warning(
                "relay failed; restarting from the last acknowledged position",
                extra={"event": "relay_restart", "error": redact(str(exc)),
                       "retry_in_s": round(backoff, 2)},
            )
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff)

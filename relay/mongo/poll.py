"""mongo-poll: finds documents with pending events, publishes them, then pulls exactly those."""

from __future__ import annotations

import logging
import threading
import time

from relay.errors import StoppedWhileBlocked
from relay.mongo.engine import (
    Lease,
    MongoRelayBase,
    Relayer,
    Scanner,
)
from relay.publisher import waiting

log = logging.getLogger(__name__)


class MongoPollRelay(MongoRelayBase):
    """The polling source for MongoDB. Runs until `stop` is set; raises RetryableError for the
    supervisor to restart it.

    Passes over each collection's documents with pending events in _id order, a page at a time,
    and sends each document's entries in list order. Once Kafka acknowledged an entry it is
    removed with `$pull` by its id, so entries appended meanwhile stay for the next pass. An entry
    still on its way is never sent twice by the same relay (the next pass skips it).
    """

    source = "mongo-poll"

    def run(self, stop: threading.Event) -> None:
        store = self._store_factory()
        lease = Lease(store, self.config, self.stats, self.owner)
        try:
            self.stats.source_connected = True
            if not lease.acquire(stop):
                return
            relayer = Relayer(self.config, store, self._publisher_factory, self.stats)
            # The lease lives on while Kafka is full; a stop does not wait for the broker.
            relayer.publisher.on_wait = waiting(stop, lease.renew)
            log.info("mongo polling relay active", extra={
                "event": "relay_active", "source": self.source,
                "collections": list(self.config.watched)})
            try:
                self._loop(relayer, lease, stop)
                remaining = relayer.drain(self.config.shutdown_timeout)
            except StoppedWhileBlocked:
                # What was not acknowledged stays in the documents: the next relay sends it.
                relayer.abandon()
                remaining = relayer.in_flight
            except BaseException:
                relayer.abandon()
                raise
            log.info("mongo polling relay stopped", extra={
                "event": "relay_stopped", "unacknowledged": remaining})
        finally:
            lease.release()
            self.stats.source_connected = False
            store.close()

    def _loop(self, relayer: Relayer, lease: Lease, stop: threading.Event) -> None:
        scanner = Scanner(self.config, relayer.store, relayer)
        while not stop.is_set():
            if relayer.has_room():
                scanner.step()
            else:
                relayer.poll(0.05)  # backpressure: the broker is slow or away
            relayer.poll(0)
            relayer.acknowledge(force=False)
            lease.renew()
            if scanner.round_complete:
                if scanner.round_sent == 0:
                    self._idle(relayer, lease, stop)
                scanner.new_round()

    def _idle(self, relayer: Relayer, lease: Lease, stop: threading.Event) -> None:
        """A pass found nothing new: finish what is in flight, then wait for the next pass."""
        deadline = time.monotonic() + self.config.poll_interval
        while relayer.in_flight and not stop.is_set() and time.monotonic() < deadline:
            relayer.poll(0.05)
            relayer.acknowledge(force=False)
            lease.renew()
        relayer.acknowledge(force=True)
        relayer.idle()
        if relayer.in_flight == 0:
            self.stats.progressed()
            lease.wait(stop, deadline - time.monotonic())

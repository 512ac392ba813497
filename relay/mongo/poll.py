"""mongo-poll: finds documents with pending events, publishes them, then pulls exactly those."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from relay.core.ports import Refused, Sink
from relay.mongo.engine import MongoRelay, MongoSource, Scanner
from relay.mongo.tracker import Pending

log = logging.getLogger(__name__)


class MongoPollSource(MongoSource):
    """The polling source for MongoDB.

    Passes over each collection's documents with pending events in _id order, a page at a time,
    and sends each document's entries in list order. Once Kafka acknowledged an entry it is
    removed with `$pull` by its id, so entries appended meanwhile stay for the next pass. An entry
    still on its way is never sent twice by the same relay (the next pass skips it).
    """

    name = "mongo-poll"

    def started(self, stop: threading.Event) -> bool:
        self._scanner = Scanner(self.config, self.store)
        self._exhausted = False  # a whole pass found nothing new: wait before the next
        log.info("mongo polling relay active", extra={
            "event": "relay_active", "source": self.name,
            "collections": list(self.config.watched)})
        return True

    def read(self, sink: Sink[Pending], park: Callable[[Refused], None], busy: bool) -> int:
        self.lease.renew()
        scanner = self._scanner
        if not self._exhausted:
            if scanner.round_complete:
                scanner.new_round()
            sent = scanner.step(
                lambda found, where: len(self.offer_all(found, where, sink, park)))
            self._exhausted = scanner.round_complete and scanner.round_sent == 0
        else:
            sent = 0
        self.caught_up = self._exhausted
        return sent

    def wait_for_more(self, stop: threading.Event) -> None:
        """A pass found nothing new and all is settled: the next pass after the interval."""
        self._exhausted = False
        self.lease.wait(stop, self.config.poll_interval)

    def finish(self, unacknowledged: int) -> None:
        log.info("mongo polling relay stopped", extra={
            "event": "relay_stopped", "unacknowledged": unacknowledged})


class MongoPollRelay(MongoRelay):
    """mongo-poll: the core driving a MongoPollSource into a sink."""

    source_class = MongoPollSource

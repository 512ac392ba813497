"""What both MongoDB sources share: sending, applying answers, parking, the lease, the scan."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping

from outbox.conninfo import redact
from relay.core.holds import KeyHolds
from relay.core.loop import RelayCore
from relay.core.ports import Cadence, Refused, Sink, SinkFactory, while_open
from relay.mongo.config import MongoRelayConfig
from relay.mongo.entries import Found, in_document, in_outbox_document
from relay.mongo.errors import LeadershipLostError
from relay.mongo.paging import Sweep
from relay.mongo.store import OutboxStore
from relay.mongo.tracker import Acknowledgements, EntryRef, Pending
from relay.sinks.kafka.sink import PublisherConfig, kafka_sink
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats

log = logging.getLogger(__name__)

StoreFactory = Callable[[], OutboxStore]
# Sends what was found in a collection (named for the logs); returns how many events it took.
Offer = Callable[[Found, str], int]


class MongoSource:
    """What both MongoDB sources share as the core's `Source` (relay/core/ports.py): the store,
    the lease, the events on their way (sent once while known), and writing Kafka's answers:
    delivered entries are pulled from their documents, refused ones parked. The token of an
    event is its `Pending` entry."""

    name = ""
    latency_per_event = True
    read_waits = False
    after_failure = "unacknowledged events will be sent again"

    def __init__(
        self,
        config: MongoRelayConfig,
        stats: RelayStats,
        store_factory: StoreFactory | None = None,
        owner: str | None = None,
    ) -> None:
        from relay.mongo.store import MongoStore

        self.config = config
        self.stats = stats
        self.owner = owner or lease_owner()
        self._store_factory = store_factory or (lambda: MongoStore(config))
        self.cadence = Cadence(room=config.batch_size, max_in_flight=config.max_in_flight,
                               ack_interval=config.ack_interval,
                               shutdown_timeout=config.shutdown_timeout)
        self.caught_up = False
        self.acks = Acknowledgements()
        self._store: OutboxStore | None = None
        self._lease: Lease | None = None

    @property
    def store(self) -> OutboxStore:
        return while_open(self._store)

    @property
    def lease(self) -> Lease:
        return while_open(self._lease)

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        store = self._store = self._store_factory()
        lease = self._lease = Lease(store, self.config, self.stats, self.owner)
        self.acks = Acknowledgements()
        try:
            self.stats.source_connected = True
            yield lease.acquire(stop) and self.started(stop)
        finally:
            lease.release()
            self.stats.source_connected = False
            store.close()

    def started(self, stop: threading.Event) -> bool:
        """The lease is held: get ready to read (False if stopped first)."""
        raise NotImplementedError

    def held_keys(self) -> KeyHolds:
        return self.store.held_keys()

    # Each source reads its own way (relay/mongo/poll.py, relay/mongo/stream.py).

    def read(self, sink: Sink[Pending], park: Callable[[Refused], None], busy: bool) -> int:
        raise NotImplementedError

    def wait_for_more(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def finish(self, unacknowledged: int) -> None:
        raise NotImplementedError

    def offer_all(
        self, found: Found, where: str, sink: Sink[Pending], park: Callable[[Refused], None]
    ) -> list[EntryRef]:
        """Send what was found, except what is already on its way; returns what was taken."""
        acks, send = self.acks, sink.send
        taken = []
        for pending in found.pending:
            if acks.is_known(pending.ref):
                continue
            # Known before `send`: a refused topic is reported from inside `send`.
            acks.sent(pending)
            if pending.record is None:
                park(Refused(pending, pending.problem or "malformed outbox entry"))
            else:
                send(pending.record, pending)
            taken.append(pending.ref)
        if found.unidentifiable:
            log.warning("outbox entries without an event id are left in place", extra={
                "event": "entry_without_id", "where": where, "count": found.unidentifiable})
        return taken

    def apply(self, delivered: list[Pending], refused: list[Refused]) -> None:
        """Park the refused entries and pull the delivered ones, in one plan."""
        acks = self.acks
        for pending in delivered:
            acks.delivered(pending)
        for parking in refused:
            acks.parked(parking.token, parking.reason)
        plan = acks.plan()
        if plan:
            self.store.apply(plan)
            acks.applied(plan)
            self.applied(plan.refs)

    def applied(self, refs: list[EntryRef]) -> None:
        """These entries' removal from their documents is applied."""

    def confirm(self, *, final: bool) -> None:
        """Nothing to confirm: an entry's removal is its acknowledgement."""

    def where(self, token: Pending) -> Mapping[str, object]:
        ref = token.ref
        return {"collection": ref.collection, "document_id": str(ref.document_id),
                "event_id": str(ref.event_id)}

    def keep_alive(self) -> None:
        self.lease.renew()

    def on_caught_up(self) -> None:
        """Nothing to do: MongoDB keeps no published entries."""

    def abandon(self, *, blocked: bool) -> None:
        """What was not acknowledged stays in the documents: the next relay sends it."""


class MongoRelay(RelayCore[Pending]):
    """A MongoDB relay: the core driving its `source_class` into a sink (Kafka unless a
    `publisher_factory` is given: the in-memory sink of unit tests)."""

    source_class: type[MongoSource]

    def __init__(
        self,
        config: MongoRelayConfig,
        publisher_config: PublisherConfig | None = None,
        stats: RelayStats | None = None,
        *,
        store_factory: StoreFactory | None = None,
        publisher_factory: SinkFactory | None = None,
        owner: str | None = None,
        topic_limits: TopicLimits | None = None,
    ) -> None:
        stats = stats or RelayStats()
        if publisher_factory is None:
            if publisher_config is None:
                raise TypeError("pass publisher_config or publisher_factory")
            publisher_factory = kafka_sink(publisher_config, stats, topic_limits)
        super().__init__(self.source_class(config, stats, store_factory, owner),
                         publisher_factory, stats)


def lease_owner() -> str:
    """A lease owner id. One per daemon, kept across its restarts: a relay restarted after an
    error takes its own lease back at once instead of waiting for it to expire."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One active relay per collection set: a lease document with an expiry, renewed by the
    leader; the others wait as standbys.

    The lease saves duplicate work, it is not what keeps events safe: two relays at once still
    publish every event at least once and in list order per document (each sends a document's
    pending list in order, and an entry leaves the list only after its delivery). So clock skew
    between relay hosts, which can let a standby take over early, costs duplicates only.
    """

    def __init__(
        self,
        store: OutboxStore,
        config: MongoRelayConfig,
        stats: RelayStats,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.stats = stats
        self.owner = owner or lease_owner()
        self._renewed = 0.0
        self.held = False

    def acquire(self, stop: threading.Event) -> bool:
        """Wait as a standby until this relay holds the lease; False if stopped first."""
        announced = False
        while not stop.is_set():
            if self.store.try_lease(self.owner, self.config.lease_ttl):
                self._renewed = time.monotonic()
                self.held = self.stats.leader = True
                return True
            if not announced:
                log.info("another relay is active on these collections; waiting as standby",
                         extra={"event": "relay_standby", "scope": self.config.scope})
                announced = True
            stop.wait(self.config.standby_interval)
        return False

    def renew(self) -> None:
        if time.monotonic() - self._renewed < self.config.lease_ttl / 3:
            return
        if not self.store.try_lease(self.owner, self.config.lease_ttl):
            self.held = self.stats.leader = False
            raise LeadershipLostError(
                f"the lease on {self.config.scope} was taken over by another relay")
        self._renewed = time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> None:
        """Sleep up to `seconds` (until stop), renewing the lease on the way."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, self.config.lease_ttl / 3))
            self.renew()

    def release(self) -> None:
        if not self.held:
            return
        self.held = self.stats.leader = False
        try:
            self.store.release_lease(self.owner)
        except Exception as exc:
            log.warning("could not release the lease; it expires by itself", extra={
                "event": "lease_release_failed", "error": redact(str(exc))})


class Scanner:
    """Passes over the relayed collections' pending documents in _id order, a page of each
    collection per step: mongo-poll's reading, and mongo-stream's catch-up scan."""

    def __init__(self, config: MongoRelayConfig, store: OutboxStore) -> None:
        self.config = config
        self.store = store
        self.sweeps = [Sweep(name, embedded=True) for name in config.collections]
        self.sweeps.append(Sweep(config.outbox_collection, embedded=False))
        self._done: set[str] = set()
        self._per_document: dict[str, float] = {}
        self.round_sent = 0

    @property
    def round_complete(self) -> bool:
        """Every collection was read to its end since `new_round`."""
        return len(self._done) == len(self.sweeps)

    def new_round(self) -> None:
        self._done.clear()
        self.round_sent = 0

    def step(self, offer: Offer) -> int:
        """Read one page of every collection not yet done this round and `offer` what it
        holds; returns how many events were taken."""
        sent = 0
        for sweep in self.sweeps:
            if sweep.collection not in self._done:
                sent += self._page(sweep, offer)
        self.round_sent += sent
        return sent

    def _limit(self, sweep: Sweep) -> int:
        # Documents holding many events fill a batch quickly: read only about as many as one
        # batch needs, so a page is not read in full to use a few of its documents.
        per_document = self._per_document.get(sweep.collection, 1.0)
        wanted = math.ceil(self.config.batch_size / max(per_document, 1.0))
        return max(1, min(self.config.page_documents, wanted))

    def _page(self, sweep: Sweep, offer: Offer) -> int:
        limit = self._limit(sweep)
        documents = self.store.page(
            sweep.collection, sweep.id_filter(), limit, embedded=sweep.embedded)
        sent = events = handled = 0
        last_id = None
        for document in documents:
            if events >= self.config.batch_size:
                break  # the rest of the page is read again next time
            if sweep.embedded:
                found = in_document(sweep.collection, document, self.config.field)
            else:
                found = in_outbox_document(sweep.collection, document)
            sent += offer(found, sweep.collection)
            events += len(found.pending)
            handled += 1
            last_id = document["_id"]
        if handled:
            seen = events / handled
            self._per_document[sweep.collection] = (
                self._per_document.get(sweep.collection, seen) + seen) / 2
        cut = handled < len(documents)
        if sweep.advance(last_id, more=cut or len(documents) >= limit):
            self._done.add(sweep.collection)
        return sent

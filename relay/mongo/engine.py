"""What both MongoDB sources share: sending, acknowledging, parking, the lease, the scan."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol, TypeVar

from outbox.conninfo import redact
from outbox.record import OutboxRecord
from relay.holds import HoldRefresh, KeyHolds, log_parked
from relay.mongo.config import MongoRelayConfig
from relay.mongo.entries import Found, in_document, in_outbox_document
from relay.mongo.errors import LeadershipLostError
from relay.mongo.paging import Sweep
from relay.mongo.store import OutboxStore
from relay.mongo.tracker import Acknowledgements, EntryRef, Pending
from relay.outcomes import BrokerCheck, FailureLatch
from relay.publisher import Delivery, KafkaPublisher, PublisherConfig, topic_limits_for
from relay.stats import RelayStats
from relay.topic_limits import TopicLimits

log = logging.getLogger(__name__)

T = TypeVar("T", contravariant=True)
OnDelivery = Callable[[Pending, Delivery], None]


class Publisher(Protocol[T]):
    """What the relay needs of `relay.publisher.KafkaPublisher` (the fake is in `testing`)."""

    in_flight: int
    on_wait: Callable[[], None]  # called while `send` waits for room (keeps the lease)
    holds: KeyHolds  # keys with a parked event: their later events are parked behind it

    def send(self, record: OutboxRecord, token: T) -> None: ...

    def poll(self, timeout: float = 0.0) -> int: ...

    def flush(self, timeout: float) -> int: ...

    def purge(self) -> None: ...

    def broker_reachable(self, timeout: float) -> bool: ...


PublisherFactory = Callable[[OnDelivery], Publisher[Pending]]
StoreFactory = Callable[[], OutboxStore]


def kafka_publisher(
    config: PublisherConfig, stats: RelayStats, limits: TopicLimits | None = None
) -> PublisherFactory:
    # What the topics accept, and which need their events sent alone: the daemon keeps one
    # across restarts (relay/mongo/factory.py).
    limits = limits or topic_limits_for(config)

    def make(on_delivery: OnDelivery) -> Publisher[Pending]:
        return KafkaPublisher[Pending](
            config, on_delivery, limits=limits,
            on_broker_state=lambda up: setattr(stats, "broker_connected", up))

    return make


class Relayer:
    """Hands pending events to Kafka and applies Kafka's answers to MongoDB: delivered entries
    are pulled from their documents, permanently refused ones parked, and any other failure
    makes the relay restart from what is still pending."""

    def __init__(
        self,
        config: MongoRelayConfig,
        store: OutboxStore,
        publisher_factory: PublisherFactory,
        stats: RelayStats,
    ) -> None:
        self.config = config
        self.store = store
        self.stats = stats
        self.acks = Acknowledgements()
        self.publisher = publisher_factory(self._on_delivery)
        self.publisher.holds = store.held_keys()
        self._last_ack = time.monotonic()
        self.failures = FailureLatch(stats)
        self.publisher.broker_reachable(timeout=5.0)
        self.check_broker = BrokerCheck(self.publisher)
        self._refresh_holds = HoldRefresh(store.held_keys, self.publisher)

    # -- sending -------------------------------------------------------------------------------

    def offer(self, pending: Pending) -> bool:
        """Send `pending` unless it is already on its way; True if it was taken now."""
        if self.acks.is_known(pending.ref):
            return False
        # Known before `send`: a refused topic is reported from inside `send`.
        self.acks.sent(pending)
        if pending.record is None:
            self.acks.parked(pending, pending.problem or "malformed outbox entry")
        else:
            self.publisher.send(pending.record, pending)
        return True

    def offer_all(self, found: Found, where: str) -> list[EntryRef]:
        taken = [p.ref for p in found.pending if self.offer(p)]
        if found.unidentifiable:
            log.warning("outbox entries without an event id are left in place", extra={
                "event": "entry_without_id", "where": where, "count": found.unidentifiable})
        return taken

    def _on_delivery(self, pending: Pending, delivery: Delivery) -> None:
        if delivery.ok:
            self.acks.delivered(pending)
            self.stats.delivered_record(delivery.topic, delivery.record.created_at)
        elif delivery.permanent:
            self.acks.parked(pending, delivery.error or "unknown")
        else:
            self.failures.failed(delivery)

    def idle(self) -> None:
        """Nothing in flight: check the broker and the held keys now and then."""
        self.check_broker()
        if self.publisher.in_flight == 0 and not self.acks.ready:
            self._refresh_holds()

    @property
    def in_flight(self) -> int:
        return self.publisher.in_flight

    def has_room(self) -> bool:
        return self.publisher.in_flight + self.config.batch_size <= self.config.max_in_flight

    def poll(self, timeout: float = 0.0) -> None:
        self.publisher.poll(timeout)
        self.stats.in_flight = self.publisher.in_flight

    # -- acknowledging -------------------------------------------------------------------------

    def acknowledge(self, *, force: bool) -> list[EntryRef]:
        """Apply Kafka's answers to MongoDB (at most every ack_interval unless forced); returns
        the entries removed. Raises DeliveryFailedError after applying what was delivered if a
        delivery failed for a reason a restart may cure."""
        failure = self.failures.first
        due = force or time.monotonic() - self._last_ack >= self.config.ack_interval
        applied: list[EntryRef] = []
        if self.acks.ready and (due or self.acks.ready >= 10_000 or failure):
            plan = self.acks.plan()
            self.store.apply(plan)
            self.acks.applied(plan)
            self._last_ack = time.monotonic()
            applied = plan.refs
            self.stats.progressed()
            for parking in plan.parks:
                self.stats.parked += 1
                log_parked(parking.reason, collection=parking.ref.collection,
                           document_id=str(parking.ref.document_id),
                           event_id=str(parking.ref.event_id))
        self.failures.raise_if_failed("unacknowledged events will be sent again")
        return applied

    def drain(self, timeout: float) -> int:
        """On stop: wait (bounded) for outstanding delivery reports and apply them."""
        remaining = self.publisher.flush(timeout)
        self.acknowledge(force=True)
        return remaining

    def abandon(self) -> None:
        """On failure: drop what librdkafka still holds, so nothing is sent behind the back of
        the relay that restarts and sends it again in order."""
        try:
            self.publisher.purge()
        except Exception as exc:
            log.debug("purge failed", extra={"event": "purge_failed", "error": str(exc)})


class MongoRelayBase:
    """What both MongoDB relays are made of: configuration, stats, and the store and publisher
    factories (real ones by default, in-memory fakes in unit tests)."""

    def __init__(
        self,
        config: MongoRelayConfig,
        publisher_config: PublisherConfig | None = None,
        stats: RelayStats | None = None,
        *,
        store_factory: StoreFactory | None = None,
        publisher_factory: PublisherFactory | None = None,
        owner: str | None = None,
        topic_limits: TopicLimits | None = None,
    ) -> None:
        from relay.mongo.store import MongoStore

        self.config = config
        self.owner = owner or lease_owner()
        self.stats = stats or RelayStats()
        self._store_factory = store_factory or (lambda: MongoStore(config))
        if publisher_factory is None:
            if publisher_config is None:
                raise TypeError("pass publisher_config or publisher_factory")
            publisher_factory = kafka_publisher(publisher_config, self.stats, topic_limits)
        self._publisher_factory = publisher_factory


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

    def __init__(self, config: MongoRelayConfig, store: OutboxStore, relayer: Relayer) -> None:
        self.config = config
        self.store = store
        self.relayer = relayer
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

    def step(self) -> int:
        """Read and send one page of every collection not yet done this round."""
        sent = 0
        for sweep in self.sweeps:
            if sweep.collection not in self._done:
                sent += self._page(sweep)
        self.round_sent += sent
        return sent

    def _limit(self, sweep: Sweep) -> int:
        # Documents holding many events fill a batch quickly: read only about as many as one
        # batch needs, so a page is not read in full to use a few of its documents.
        per_document = self._per_document.get(sweep.collection, 1.0)
        wanted = math.ceil(self.config.batch_size / max(per_document, 1.0))
        return max(1, min(self.config.page_documents, wanted))

    def _page(self, sweep: Sweep) -> int:
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
            sent += len(self.relayer.offer_all(found, sweep.collection))
            events += len(found.pending)
            handled += 1
            last_id = document["_id"]
        if handled:
            seen = events / handled
            self._per_document[sweep.collection] = (
                self._per_document.get(sweep.collection, seen) + seen) / 2
        cut = handled < len(documents)
        if sent:
            self.relayer.stats.batches += 1
            self.relayer.stats.batch_events += sent
        if sweep.advance(last_id, more=cut or len(documents) >= limit):
            self._done.add(sweep.collection)
        return sent

"""mongo-stream: publishes events as a change stream reports them; stores the resume token."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from relay.errors import FatalRelayError, SourceUnavailableError, StoppedWhileBlocked
from relay.mongo.config import MongoRelayConfig
from relay.mongo.engine import (
    Lease,
    MongoRelayBase,
    PublisherFactory,
    Relayer,
    Scanner,
    StoreFactory,
)
from relay.mongo.entries import in_change
from relay.mongo.errors import ResumeTokenInvalidError
from relay.mongo.store import ChangeSource, OutboxStore
from relay.mongo.tracker import TokenLog
from relay.publisher import PublisherConfig, waiting
from relay.stats import RelayStats
from relay.topic_limits import TopicLimits

log = logging.getLogger(__name__)

Token = Mapping[str, Any]


class MongoStreamRelay(MongoRelayBase):
    """The change-stream source for MongoDB. Runs until `stop` is set; raises RetryableError for
    the supervisor to restart it.

    One change stream over the database, filtered to the relayed collections, gives inserts,
    replaces and updates in commit order; each brings the entries it wrote, which are sent in
    that order. The resume token of a change is stored only once every event of that change and
    of all changes before it was acknowledged by Kafka and pulled from its document (TokenLog).
    Without a usable token (first start, history lost, token not recognised) the relay takes the
    stream's current position first, then scans every collection like mongo-poll until all that
    was pending is acknowledged, and only then streams from the position taken before the scan:
    a change made meanwhile is found by the scan or replayed by the stream, perhaps both.
    """

    source = "mongo-stream"

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
        super().__init__(config, publisher_config, stats, store_factory=store_factory,
                         publisher_factory=publisher_factory, owner=owner,
                         topic_limits=topic_limits)
        # A short server-side wait keeps delivery reports and the lease served while idle.
        self._max_await = min(config.poll_interval, 0.1)
        self._saved: Token | None = None
        self._candidate: Token | None = None
        self._last_save = time.monotonic()
        self._progressed = False

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
            try:
                stream = self._open(store, relayer, lease, stop)
                if stream is not None:
                    try:
                        self._loop(stream, store, relayer, lease, stop)
                    finally:
                        stream.close()
                else:
                    relayer.drain(self.config.shutdown_timeout)
            except StoppedWhileBlocked:
                # What was not acknowledged stays in the documents (and after the stored
                # token): the next relay sends it.
                relayer.abandon()
            except BaseException:
                relayer.abandon()
                raise
        finally:
            lease.release()
            self.stats.source_connected = False
            store.close()

    # -- start: resume, or scan from a position taken before the scan ------------------------------

    def _open(
        self, store: OutboxStore, relayer: Relayer, lease: Lease, stop: threading.Event
    ) -> ChangeSource | None:
        token = store.load_token()
        if token is not None:
            try:
                stream = store.watch(token, self._max_await)
            except ResumeTokenInvalidError as exc:
                log.warning(
                    "the stored resume token cannot be used; scanning every collection before "
                    "streaming", extra={"event": "stream_token_invalid", "error": str(exc)})
                store.clear_token()
            else:
                self._saved = token
                log.info("change stream resumed from the stored token", extra={
                    "event": "stream_resumed", "source": self.source,
                    "collections": list(self.config.watched)})
                return stream
        else:
            log.info("no resume token stored; scanning every collection before streaming",
                     extra={"event": "stream_scan_start"})
        probe = store.watch(None, self._max_await)
        start = probe.resume_token
        probe.close()
        if start is None:
            raise FatalRelayError(
                "the server gave no resume token when the change stream opened; mongo-stream "
                "needs MongoDB 4.0.7 or later (or use --source mongo-poll)")
        if not self._catch_up(store, relayer, lease, stop):
            return None
        # Everything pending before `start` is acknowledged: `start` may be stored.
        store.save_token(start)
        self._saved = start
        log.info("scan complete; streaming from the position taken before it", extra={
            "event": "stream_scan_done", "source": self.source,
            "collections": list(self.config.watched)})
        return store.watch(start, self._max_await)

    def _catch_up(
        self, store: OutboxStore, relayer: Relayer, lease: Lease, stop: threading.Event
    ) -> bool:
        """One full pass over every collection, then wait until all of it is acknowledged."""
        scanner = Scanner(self.config, store, relayer)
        while not stop.is_set() and not scanner.round_complete:
            if relayer.has_room():
                scanner.step()
            else:
                relayer.poll(0.05)
            relayer.poll(0)
            relayer.acknowledge(force=False)
            lease.renew()
        while (relayer.in_flight or relayer.acks.ready) and not stop.is_set():
            relayer.poll(0.05)
            relayer.acknowledge(force=False)
            lease.renew()
        relayer.acknowledge(force=True)
        return not stop.is_set() and len(relayer.acks) == 0

    # -- streaming ---------------------------------------------------------------------------

    def _loop(
        self,
        stream: ChangeSource,
        store: OutboxStore,
        relayer: Relayer,
        lease: Lease,
        stop: threading.Event,
    ) -> None:
        tokens = TokenLog()
        config = self.config
        while not stop.is_set():
            change = None
            if relayer.has_room():
                change = stream.try_next()
                if change is not None:
                    found = in_change(
                        change, list_field=config.field, marker_field=config.marker_field,
                        outbox_collection=config.outbox_collection)
                    sent = relayer.offer_all(found, str(change.get("ns", {}).get("coll")))
                    tokens.change(change["_id"], sent)
                    if sent:
                        self._progressed = True
                        self.stats.batches += 1
                        self.stats.batch_events += len(sent)
            else:
                relayer.poll(0.05)  # backpressure: the broker is slow or away
            relayer.poll(0)
            tokens.acknowledged(relayer.acknowledge(force=change is None))
            self._store_token(store, stream, tokens, force=False)
            lease.renew()
            if change is None:
                if relayer.in_flight == 0:
                    self.stats.progressed()
                relayer.idle()
                if not stream.alive:
                    raise SourceUnavailableError(
                        "the server closed the change stream (a watched collection or the "
                        "database was dropped or renamed?)")
        remaining = relayer.publisher.flush(config.shutdown_timeout)
        tokens.acknowledged(relayer.acknowledge(force=True))
        self._store_token(store, stream, tokens, force=True)
        log.info("mongo change-stream relay stopped", extra={
            "event": "relay_stopped", "unacknowledged": remaining})

    def _store_token(
        self, store: OutboxStore, stream: ChangeSource, tokens: TokenLog, *, force: bool
    ) -> None:
        committable = tokens.committable()
        if committable is not None:
            self._candidate = committable
        if tokens.empty and stream.resume_token is not None:
            # Every change returned so far is done, so the stream's own position (the last
            # change, or the server's post-batch token past it) is safe too.
            self._candidate = stream.resume_token
        candidate = self._candidate
        if candidate is None or candidate == self._saved:
            return
        since = time.monotonic() - self._last_save
        due = (
            force
            or (self._progressed and since >= self.config.ack_interval)
            # Idle: refresh now and then, so the token stays inside the oplog's window.
            or since >= self.config.token_interval
        )
        if not due:
            return
        store.save_token(candidate)
        self._saved = candidate
        self._last_save = time.monotonic()
        self._progressed = False

"""mongo-stream: publishes events as a change stream reports them; stores the resume token."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from relay.core.ports import Refused, Sink
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.mongo.engine import MongoRelay, MongoSource, Scanner
from relay.mongo.entries import in_change
from relay.mongo.errors import ResumeTokenInvalidError
from relay.mongo.store import ChangeSource
from relay.mongo.tracker import EntryRef, Pending, TokenLog

log = logging.getLogger(__name__)

Token = Mapping[str, Any]


class MongoStreamSource(MongoSource):
    """The change-stream source for MongoDB.

    One change stream over the database, filtered to the relayed collections, gives inserts,
    replaces and updates in commit order; each brings the entries it wrote, which are sent in
    that order. The resume token of a change is stored only once every event of that change and
    of all changes before it was acknowledged by Kafka and pulled from its document (TokenLog).
    Without a usable token (first start, history lost, token not recognised) the relay takes the
    stream's current position first, then scans every collection like mongo-poll until all that
    was pending is acknowledged, and only then streams from the position taken before the scan:
    a change made meanwhile is found by the scan or replayed by the stream, perhaps both.
    """

    name = "mongo-stream"
    _stream: ChangeSource | None = None  # while catching up: none yet

    @property
    def read_waits(self) -> bool:  # type: ignore[override]
        """Streaming, `read` waits on the server (max_await); the catch-up scan does not."""
        return self._stream is not None

    def started(self, stop: threading.Event) -> bool:
        # A short server-side wait keeps delivery reports and the lease served while idle.
        self._max_await = min(self.config.poll_interval, 0.1)
        self._tokens = TokenLog()
        self._saved: Token | None = None
        self._candidate: Token | None = None
        self._last_save = time.monotonic()
        self._progressed = False
        self._stream = None
        self._catching_up: Scanner | None = None
        self._scan_start: Token | None = None
        store = self.store
        token = store.load_token()
        if token is not None:
            try:
                self._stream = store.watch(token, self._max_await)
            except ResumeTokenInvalidError as exc:
                log.warning(
                    "the stored resume token cannot be used; scanning every collection before "
                    "streaming", extra={"event": "stream_token_invalid", "error": str(exc)})
                store.clear_token()
            else:
                self._saved = token
                log.info("change stream resumed from the stored token", extra={
                    "event": "stream_resumed", "source": self.name,
                    "collections": list(self.config.watched)})
                return True
        else:
            log.info("no resume token stored; scanning every collection before streaming",
                     extra={"event": "stream_scan_start"})
        probe = store.watch(None, self._max_await)
        self._scan_start = probe.resume_token
        probe.close()
        if self._scan_start is None:
            raise FatalRelayError(
                "the server gave no resume token when the change stream opened; mongo-stream "
                "needs MongoDB 4.0.7 or later (or use --source mongo-poll)")
        self._catching_up = Scanner(self.config, store)
        return True

    def read(self, sink: Sink[Pending], park: Callable[[Refused], None], busy: bool) -> int:
        self.lease.renew()
        scanner = self._catching_up
        if scanner is not None:
            # One full pass over every collection; `wait_for_more` streams once it is settled.
            self.caught_up = scanner.round_complete
            if self.caught_up:
                return 0
            return scanner.step(lambda found, where: len(self.offer_all(found, where, sink, park)))
        stream = self._stream
        assert stream is not None
        change = stream.try_next()
        if change is None:
            self.caught_up = True
            if not stream.alive:
                raise SourceUnavailableError(
                    "the server closed the change stream (a watched collection or the "
                    "database was dropped or renamed?)")
            return 0
        self.caught_up = False
        config = self.config
        found = in_change(change, list_field=config.field, marker_field=config.marker_field,
                          outbox_collection=config.outbox_collection)
        sent = self.offer_all(found, str(change.get("ns", {}).get("coll")), sink, park)
        self._tokens.change(change["_id"], sent)
        if sent:
            self._progressed = True
        return len(sent)

    def wait_for_more(self, stop: threading.Event) -> None:
        """After the catch-up scan, once all of it is acknowledged: stream from the position
        taken before it. While streaming, `read` waits on the stream itself."""
        if self._catching_up is None or len(self.acks) or stop.is_set():
            return
        start = self._scan_start
        assert start is not None
        # Everything pending before `start` is acknowledged: `start` may be stored.
        self.store.save_token(start)
        self._saved = start
        log.info("scan complete; streaming from the position taken before it", extra={
            "event": "stream_scan_done", "source": self.name,
            "collections": list(self.config.watched)})
        self._stream = self.store.watch(start, self._max_await)
        self._catching_up = None

    def applied(self, refs: list[EntryRef]) -> None:
        self._tokens.acknowledged(refs)

    def confirm(self, *, final: bool) -> None:
        """Store the newest resume token that may be (TokenLog), at the cadence."""
        stream = self._stream
        if stream is None:
            return
        tokens = self._tokens
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
            final
            or (self._progressed and since >= self.config.ack_interval)
            # Idle: refresh now and then, so the token stays inside the oplog's window.
            or since >= self.config.token_interval
        )
        if not due:
            return
        self.store.save_token(candidate)
        self._saved = candidate
        self._last_save = time.monotonic()
        self._progressed = False

    def finish(self, unacknowledged: int) -> None:
        self._close_stream()
        if self._catching_up is None:
            log.info("mongo change-stream relay stopped", extra={
                "event": "relay_stopped", "unacknowledged": unacknowledged})

    def abandon(self, *, blocked: bool) -> None:
        # What was not acknowledged stays in the documents (and after the stored token).
        self._close_stream()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()


class MongoStreamRelay(MongoRelay):
    """mongo-stream: the core driving a MongoStreamSource into a sink."""

    source_class = MongoStreamSource

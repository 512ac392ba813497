"""The console's requests: the page from the relay's own figures (relay/stats.py, the source's
gauges, readiness of relay/metrics.py), and redrive of parked events behind a token."""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from outbox.conninfo import redact
from relay.console import page
from relay.console.parked import MongoParked, ParkedGroup, ParkedStore, PostgresParked
from relay.settings import RelaySettings
from relay.stats import THROUGHPUT_INTERVAL, RelayStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    status: int
    html: str


class Console:
    """Read-only unless a token is given; redrive compares it in constant time."""

    def __init__(
        self,
        stats: RelayStats,
        parked: ParkedStore | None,
        *,
        token: str | None,
        stall_timeout: float,
        rate_interval: float = THROUGHPUT_INTERVAL,
    ) -> None:
        self.stats = stats
        self.parked = parked
        self.token = token
        self.stall_timeout = stall_timeout
        self.rate_interval = rate_interval

    def view(self) -> page.ConsoleView:
        from relay.metrics import read_gauges, readiness

        s = self.stats
        ready, detail = readiness(s, self.stall_timeout)
        gauges = read_gauges(s)
        backlog = int(gauges["backlog_events"]) if "backlog_events" in gauges else None
        retained = gauges.get("slot_retained_wal_bytes", s.slot_retained_bytes)
        groups: tuple[ParkedGroup, ...] | None = ()
        error = None
        if self.parked is None:
            groups, error = None, "this source keeps no parked events"
        else:
            try:
                groups = tuple(self.parked.groups())
            except Exception as exc:  # the page shows why, the figures above still count
                groups, error = None, redact(str(exc)) or type(exc).__name__
        return page.ConsoleView(
            source=s.source,
            leader=s.leader,
            ready=ready,
            source_connected=s.source_connected,
            broker_connected=s.broker_connected,
            stalled=bool(detail["stalled"]),
            in_flight=s.in_flight,
            delivered=s.delivered_total,
            parked_since_start=s.parked,
            restarts=s.restarts,
            backlog=backlog,
            # The gauge reads 0 with nothing pending: no oldest event then, not one 0 s old.
            oldest_pending_age=gauges.get("oldest_pending_age_seconds") if backlog else None,
            slot_retained_bytes=int(retained) if retained is not None else None,
            slot_over_budget=s.slot_over_budget,
            last_published=dt.datetime.fromtimestamp(s.last_published_at, dt.UTC)
            if s.last_published_at is not None else None,
            rates=tuple(s.throughput.rates()),
            rate_interval=self.rate_interval,
            parked=groups,
            parked_error=error,
            can_redrive=self.token is not None and self.parked is not None,
        )

    def page(self) -> Answer:
        return Answer(200, page.render(self.view()))

    def _group(self, event_id: uuid.UUID) -> ParkedGroup | None:
        assert self.parked is not None
        for group in self.parked.groups():
            if group.redrive_id == event_id or any(
                    line.event_id == str(event_id) for line in group.events):
                return group
        return None

    def _read_only(self) -> Answer | None:
        if self.token is None or self.parked is None:
            return Answer(403, page.message(
                "refused", "the console is read-only: the relay runs without --console-token",
                refused=True))
        return None

    def redrive_form(self, query: Mapping[str, str]) -> Answer:
        refused = self._read_only()
        if refused is not None:
            return refused
        event_id = _event_id(query.get("id", ""))
        group = self._group(event_id) if event_id is not None else None
        if group is None or group.redrive_id is None:
            return Answer(404, page.message("not found", "no re-queueable parked event with "
                                            "this id", refused=True))
        return Answer(200, page.redrive_form(group))

    def redrive(self, form: Mapping[str, str], authorization: str | None) -> Answer:
        """Re-queue the parked events of the key of form['id'] when the token matches (the
        form's `token`, or an `Authorization: Bearer` header)."""
        refused = self._read_only()
        if refused is not None:
            return refused
        assert self.token is not None and self.parked is not None
        given = form.get("token", "")
        if not given and authorization and authorization.startswith("Bearer "):
            given = authorization[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("console redrive refused: wrong or missing token",
                        extra={"event": "console_redrive_refused"})
            return Answer(403, page.message("refused", "wrong or missing console token",
                                            refused=True))
        event_id = _event_id(form.get("id", ""))
        if event_id is None:
            return Answer(400, page.message("bad request", "id must be a parked event's id",
                                            refused=True))
        try:
            moved = self.parked.redrive(event_id)
        except Exception as exc:  # the operator sees why; nothing was re-queued (one transaction)
            log.warning("console redrive failed", extra={
                "event": "console_redrive_failed", "error": redact(str(exc))})
            return Answer(500, page.message("failed", redact(str(exc)), refused=True))
        log.info("parked events re-queued from the console", extra={
            "event": "console_redrive", "id": str(event_id), "requeued": moved})
        return Answer(200, page.message(
            "redriven", f"re-queued {moved} event(s) of the key of {event_id}", refused=False))


def _event_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def parked_store(settings: RelaySettings) -> ParkedStore | None:
    """Where the relay of `settings` parks events: its parked table or collection."""
    if settings.mongo_url is not None and settings.source.startswith("mongo"):
        from relay.mongo.factory import config

        return MongoParked(config(settings))
    if settings.db_url is not None:
        return PostgresParked(settings.db_url, settings.names)
    return None


def console_for(settings: RelaySettings, stats: RelayStats) -> Console:
    return Console(stats, parked_store(settings), token=settings.console_token,
                   stall_timeout=settings.stall_timeout)

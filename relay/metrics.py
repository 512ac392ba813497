"""Prometheus metrics, /healthz and /readyz on one port, read from the relay's RelayStats."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from outbox.conninfo import redact
from relay.stats import THROUGHPUT_INTERVAL, LabelledGauge, RelayStats

if TYPE_CHECKING:
    from relay.console.app import Answer, Console

log = logging.getLogger(__name__)


class RelayCollector(Collector):
    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        published = CounterMetricFamily(
            "outbox_events_published", "Events acknowledged by Kafka.", labels=["topic"])
        for topic, count in list(s.published.items()):
            published.add_metric([topic], count)
        yield published
        yield CounterMetricFamily("outbox_delivery_errors", "Failed delivery reports.",
                                  value=s.delivery_errors)
        yield CounterMetricFamily("outbox_events_parked", "Events that can never be published.",
                                  value=s.parked)
        yield CounterMetricFamily("outbox_relay_restarts", "Restarts after transient failures.",
                                  value=s.restarts)
        yield CounterMetricFamily("outbox_slot_recoveries", "Lost replication slots recovered.",
                                  value=s.slot_recoveries)
        yield CounterMetricFamily(
            "outbox_wal_skipped_events",
            "Events the server sent again that Kafka had acknowledged before: not published.",
            value=s.wal_skipped)
        if s.slot_over_budget is not None:
            yield GaugeMetricFamily("outbox_slot_over_wal_budget",
                                    "1 while the slot retains more WAL than --max-slot-wal.",
                                    value=1 if s.slot_over_budget else 0)
        yield CounterMetricFamily("outbox_batches", "Batches read from the source.",
                                  value=s.batches)
        yield CounterMetricFamily("outbox_batch_events", "Events in those batches.",
                                  value=s.batch_events)
        yield GaugeMetricFamily("outbox_in_flight", "Events sent, not yet acknowledged.",
                                value=s.in_flight)
        yield GaugeMetricFamily("outbox_relay_leader", "1 when this relay is the active one.",
                                value=1 if s.leader else 0)
        if s.last_published_at is not None:
            yield GaugeMetricFamily("outbox_last_published_timestamp_seconds",
                                    "Unix time of the last acknowledged event.",
                                    value=s.last_published_at)
        latency = HistogramMetricFamily(
            "outbox_commit_to_kafka_seconds",
            "From the event's commit (postgres-wal) or creation (other sources) to Kafka's "
            "acknowledgement.")
        latency.add_metric([], s.latency.cumulative(), sum_value=s.latency.total)
        yield latency
        for name, value in read_gauges(s).items():
            yield GaugeMetricFamily(f"outbox_{name}", name.replace("_", " ") + ".", value=value)
        for gauge in read_labelled(s):
            family = GaugeMetricFamily(f"outbox_{gauge.name}", gauge.help, labels=[gauge.label])
            for key, value in gauge.values.items():
                family.add_metric([key], value)  # prometheus_client escapes the label value
            yield family


def read_gauges(stats: RelayStats) -> dict[str, float]:
    """The source's gauges now (backlog, slot...): those that answered, by name."""
    values: dict[str, float] = {}
    for name, probe in list(stats.gauges.items()):
        try:
            value = probe()
        except Exception as exc:  # a scrape must not fail because one probe did
            log.warning("metric probe failed", extra={
                "event": "probe_failed", "probe": name, "error": redact(str(exc))})
            continue
        if value is not None:
            values[name] = value
    return values


def read_labelled(stats: RelayStats) -> list[LabelledGauge]:
    """The labelled gauges now (per shard...): those of the probes that answered."""
    gauges: list[LabelledGauge] = []
    for name, probe in list(stats.labelled.items()):
        try:
            gauges += probe()
        except Exception as exc:  # a scrape must not fail because one probe did
            log.warning("metric probe failed", extra={
                "event": "probe_failed", "probe": name, "error": redact(str(exc))})
    return gauges


def readiness(stats: RelayStats, stall_seconds: float) -> tuple[bool, dict[str, Any]]:
    """Ready: the active relay is connected to the source and the broker and not stalled with
    work in flight; a standby is ready while it is connected to the source, waiting its turn
    (so an orchestrator can roll out a second replica). Progress is acknowledgements moving, not
    being caught up: a long backlog drain is healthy."""
    stalled = stats.in_flight > 0 and time.monotonic() - stats.last_progress_at > stall_seconds
    detail: dict[str, Any] = {
        "source_connected": stats.source_connected,
        "broker_connected": stats.broker_connected,
        "leader": stats.leader,
        "in_flight": stats.in_flight,
        "stalled": stalled,
    }
    if stats.slot_over_budget is not None:
        # Reported, not failed on: the relay is still correct; the database's disk is at risk.
        detail["slot_over_wal_budget"] = stats.slot_over_budget
        detail["slot_retained_wal_bytes"] = stats.slot_retained_bytes
    if not stats.leader:
        return stats.source_connected, detail
    return stats.source_connected and stats.broker_connected and not stalled, detail


# A redrive form is a few hundred bytes; anything much larger is not one.
MAX_FORM_BYTES = 8192
# The console's pages load nothing from elsewhere and run no script.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


class MetricsServer:
    """Serves /metrics, /healthz (the process answers), /readyz and, with a `console`, the
    operator console (`/`, `/redrive`) on 127.0.0.1 or `host`."""

    def __init__(
        self, stats: RelayStats, port: int, host: str = "0.0.0.0", *, stall_timeout: float,
        console: Console | None = None, sample_interval: float = THROUGHPUT_INTERVAL,
    ) -> None:
        registry = CollectorRegistry()
        registry.register(RelayCollector(stats))
        self.stats = stats
        self.sample_interval = sample_interval
        self._stopped = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if console is not None and self.path.split("?")[0] in ("/", "/redrive"):
                    url = urlsplit(self.path)
                    answer = console.page() if url.path == "/" else console.redrive_form(
                        dict(parse_qsl(url.query)))
                    self._answer(answer)
                elif self.path == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
                elif self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif self.path == "/readyz":
                    ready, detail = readiness(stats, stall_timeout)
                    body = json.dumps({"ready": ready, **detail}).encode()
                    self._send(200 if ready else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def do_POST(self) -> None:
                if console is None or self.path != "/redrive":
                    self._send(404, b"not found\n", "text/plain")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_FORM_BYTES:
                    self._send(413, b"form too large\n", "text/plain")
                    return
                form = dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))
                self._answer(console.redrive(form, self.headers.get("Authorization")))

            def _answer(self, answer: Answer) -> None:
                self._send(answer.status, answer.html.encode(), "text/html; charset=utf-8",
                           CONSOLE_HEADERS)

            def _send(self, code: int, body: bytes, content_type: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would flood the relay's log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True)
        self._sampler = threading.Thread(target=self._sample, name="throughput", daemon=True)

    def _sample(self) -> None:
        """The events/s chart's clock: one sample of the delivered total per interval."""
        while True:
            self.stats.throughput.sample(self.stats.delivered_total, time.monotonic())
            if self._stopped.wait(self.sample_interval):
                return

    def start(self) -> MetricsServer:
        self._thread.start()
        self._sampler.start()
        log.info("metrics and health endpoints listening", extra={
            "event": "metrics_listening", "port": self.port})
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._sampler.join(5)

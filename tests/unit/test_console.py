"""The operator console without a server: its page, its chart, and who may redrive."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

import pytest

from outbox.errors import ConfigurationError
from relay.console.app import Console
from relay.console.page import ConsoleView, chart, render
from relay.console.parked import ParkedGroup, ParkedLine
from relay.settings import RelaySettings, read_token_file
from relay.stats import RelayStats, Throughput

TOKEN = "s3cret-console-token-0123"
WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


class FakeParked:
    """An in-memory parked store: one key with two events, one event without a key."""

    def __init__(self) -> None:
        self.first, self.second = uuid.uuid4(), uuid.uuid4()
        self.redriven: list[uuid.UUID] = []

    def groups(self, limit: int = 200) -> list[ParkedGroup]:
        return [
            ParkedGroup("order/<b>42</b>", self.first, (
                ParkedLine(str(self.first), "Placed, 200000 bytes", WHEN,
                           "MSG_SIZE_TOO_LARGE <script>alert(1)</script>"),
                ParkedLine(str(self.second), "Paid, 10 bytes", WHEN, f"held behind {self.first}"),
            )),
            ParkedGroup(None, None, (ParkedLine("#7", "unreadable change", WHEN, "no id"),)),
        ]

    def redrive(self, event_id: uuid.UUID) -> int:
        self.redriven.append(event_id)
        return 2


class BrokenParked(FakeParked):
    def groups(self, limit: int = 200) -> list[ParkedGroup]:
        raise OSError("cannot reach postgresql://relay:hunter2@db.internal:5432/app")


def stats() -> RelayStats:
    s = RelayStats(source="postgres-poll", leader=True, source_connected=True,
                   broker_connected=True, restarts=3, parked=2)
    s.published.update({"orders": 1200, "payments": 34})
    s.gauges.update({"backlog_events": lambda: 4321, "oldest_pending_age_seconds": lambda: 75.5})
    return s


def console(token: str | None = TOKEN, parked: FakeParked | None = None) -> Console:
    return Console(stats(), parked or FakeParked(), token=token, stall_timeout=60)


def figure(html: str, element: str) -> str:
    found = re.search(rf'<dd id="{element}">(.*?)</dd>', html)
    assert found, f"{element} not on the page"
    return re.sub(r"<[^>]+>", "", found[1])


def test_the_page_shows_the_relays_figures_from_its_stats() -> None:
    html = console().page().html
    assert figure(html, "role") == "active"
    assert figure(html, "source-state") == "connected"
    assert figure(html, "broker-state") == "connected"
    assert figure(html, "backlog") == "4,321 event(s)"
    assert figure(html, "oldest") == "75.5s"
    assert figure(html, "delivered") == "1,234"
    assert figure(html, "restarts") == "3"
    assert "slot-wal" not in html  # not a WAL relay


def test_a_standby_and_a_wal_slot_over_its_budget_are_shown() -> None:
    s = stats()
    s.leader = False
    s.gauges["slot_retained_wal_bytes"] = lambda: 3 * 1024 ** 3
    s.slot_over_budget = True
    html = Console(s, None, token=None, stall_timeout=60).page().html
    assert figure(html, "role") == "standby"
    assert figure(html, "slot-wal") == "3.0 GiB (OVER --max-slot-wal)"
    assert "this source keeps no parked events" in html


def test_the_page_is_self_contained_refreshes_and_fits_a_phone() -> None:
    html = console().page().html
    assert '<meta http-equiv="refresh"' in html
    assert 'name="viewport"' in html
    assert "<script" not in html.replace("&lt;script", "")
    assert not re.search(r'(src|href)="(https?:)?//', html), "nothing is fetched from elsewhere"


def test_parked_events_are_grouped_by_key_and_escaped() -> None:
    parked = FakeParked()
    html = console(parked=parked).page().html
    assert "key order/&lt;b&gt;42&lt;/b&gt; (2)" in html
    assert "without a key (1)" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert f'href="/redrive?id={parked.first}"' in html
    assert html.count('href="/redrive') == 1, "an event without a key cannot be redriven"


def test_read_only_without_a_token_and_redrive_refused_with_403() -> None:
    parked = FakeParked()
    read_only = console(token=None, parked=parked)
    html = read_only.page().html
    assert "/redrive" not in html and "read-only" in html
    answer = read_only.redrive({"id": str(parked.first), "token": TOKEN}, None)
    assert answer.status == 403
    assert read_only.redrive_form({"id": str(parked.first)}).status == 403
    assert parked.redriven == []


@pytest.mark.parametrize("form,authorization", [
    ({}, None),
    ({"token": ""}, None),
    ({"token": TOKEN[:-1]}, None),
    ({"token": TOKEN + "x"}, None),
    ({}, f"Basic {TOKEN}"),
    ({}, "Bearer wrong-token-of-some-length"),
])
def test_a_redrive_with_a_wrong_or_missing_token_is_refused(
    form: dict[str, str], authorization: str | None
) -> None:
    parked = FakeParked()
    answer = console(parked=parked).redrive({"id": str(parked.first), **form}, authorization)
    assert answer.status == 403
    assert "wrong or missing console token" in answer.html
    assert parked.redriven == []


def test_a_redrive_with_the_token_requeues_the_key() -> None:
    parked = FakeParked()
    app = console(parked=parked)
    form = app.redrive_form({"id": str(parked.second)})  # any event of the key finds it
    assert form.status == 200
    assert 'type="password" name="token"' in form.html
    assert f'name="id" value="{parked.first}"' in form.html
    assert "http-equiv" not in form.html, "a refresh would lose the typed token"
    answer = app.redrive({"id": str(parked.first), "token": TOKEN}, None)
    assert answer.status == 200 and "re-queued 2 event(s)" in answer.html
    assert app.redrive({"id": str(parked.first)}, f"Bearer {TOKEN}").status == 200
    assert parked.redriven == [parked.first, parked.first]
    assert app.redrive({"id": "not-an-id", "token": TOKEN}, None).status == 400
    assert app.redrive_form({"id": str(uuid.uuid4())}).status == 404


def test_an_unreadable_parked_store_is_explained_without_its_password() -> None:
    html = console(parked=BrokenParked()).page().html
    assert "unavailable: cannot reach postgresql://relay:***@db.internal" in html
    assert "hunter2" not in html
    assert figure(html, "backlog") == "4,321 event(s)", "the figures still show"


def test_the_chart_draws_events_per_second_newest_last() -> None:
    throughput = Throughput(slots=3)
    assert throughput.rates() == []
    for now, total in ((0.0, 0), (5.0, 50), (10.0, 50), (15.0, 550), (20.0, 600)):
        throughput.sample(total, now)
    assert throughput.rates() == [0.0, 100.0, 10.0], "the oldest interval fell out"
    svg = chart(tuple(throughput.rates()), 5.0)
    assert "<polyline" in svg and 'points="0.0,60.0 150.0,4.0 300.0,54.4"' in svg
    assert "now 10.0/s, peak 100.0/s" in svg
    assert "collecting" in chart((), 5.0)


def test_render_needs_no_relay() -> None:
    view = ConsoleView(source="mongo-stream", leader=False, ready=False, source_connected=False,
                       broker_connected=False, stalled=True, in_flight=5, delivered=0,
                       parked_since_start=0, restarts=0, parked=(), generated_at=WHEN)
    html = render(view)
    assert "2026-01-02 03:04:05 UTC" in html
    assert "no (stalled)" in html and "no parked events" in html


def test_console_token_is_checked_at_start_up_and_never_printed(tmp_path: Path) -> None:
    base = {"source": "postgres-poll", "db_url": "postgresql://x/y", "kafka_bootstrap": "k:9092"}
    with pytest.raises(ConfigurationError, match="console_token needs metrics_port"):
        RelaySettings(**base, console_token=TOKEN)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        RelaySettings(**base, metrics_port=9000, console_token="short")  # type: ignore[arg-type]
    settings = RelaySettings(**base, metrics_port=9000, console_token=TOKEN)  # type: ignore[arg-type]
    assert settings.redacted()["console_token"] == "***"
    assert TOKEN not in repr(settings)
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token_file(str(path), "console_token_file") == TOKEN
    path.write_text("")
    with pytest.raises(ConfigurationError, match="is empty"):
        read_token_file(str(path), "console_token_file")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        read_token_file(str(tmp_path / "missing"), "console_token_file")


def test_the_metrics_port_serves_the_console_with_its_guards() -> None:
    import urllib.error
    import urllib.request

    from relay.metrics import MetricsServer
    from tests.support.relays import wait_for

    parked = FakeParked()
    s = stats()
    server = MetricsServer(s, 0, "127.0.0.1", stall_timeout=60, sample_interval=0.05,
                           console=Console(s, parked, token=TOKEN, stall_timeout=60)).start()
    base = f"http://127.0.0.1:{server.port}"

    def call(path: str, data: bytes | None = None) -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=data),
                                        timeout=10) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    try:
        status, headers, html = call("/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert figure(html, "delivered") == "1,234"
        assert call("/metrics")[0] == 200
        assert call(f"/redrive?id={parked.first}")[0] == 200
        assert call("/redrive", b"id=" + str(parked.first).encode())[0] == 403
        assert call("/redrive", b"x" * 10_000)[0] == 413
        assert call("/elsewhere", b"token=" + TOKEN.encode())[0] == 404
        status, _, html = call("/redrive", f"id={parked.first}&token={TOKEN}".encode())
        assert status == 200 and parked.redriven == [parked.first]
        s.published["orders"] += 500  # deliveries while the sampler runs: the chart shows them
        wait_for(lambda: any(rate > 0 for rate in s.throughput.rates()), 10, "a rate above 0")
    finally:
        server.stop()

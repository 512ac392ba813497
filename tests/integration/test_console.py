"""The operator console of a real relay draining a backlog: the page over HTTP and in a real
headless browser, and redrive of a parked event with the token (403 without it)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import outbox
from relay.settings import RelaySettings
from tests.integration.test_relay_config import relay_cli
from tests.integration.test_relay_metrics import free_port, get
from tests.support.browser import Browser
from tests.support.kafka import (
    TopicReader,
    create_topics,
    incompressible,
    raise_topic_limit,
    unique_topic,
)
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread, wait_for
from tests.support.sources import SOURCES, RelaySource, make_source
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration

TOKEN = "console-test-token-6f1e2d"
TOPIC_LIMIT = 100_000
BACKLOG = 2_000


@dataclass
class RunningConsole:
    port: int
    topic: str
    large: outbox.Event
    ledger: Ledger
    reader: TopicReader
    bootstrap: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page(self) -> str:
        status, html = get(self.port, "/")
        assert status == 200, html
        return html

    def post(self, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{self.url}/redrive", data=urllib.parse.urlencode(form).encode(), method="POST",
            headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def figure(html: str, element: str) -> str:
    found = re.search(rf'<dd id="{element}">(.*?)</dd>', html)
    assert found, f"{element} not on the page"
    return re.sub(r"<[^>]+>", "", found[1])


@pytest.fixture
def console(db_url: str, kafka_bootstrap: str) -> Iterator[RunningConsole]:
    """A polling relay with the console and a token, started on a backlog of BACKLOG events
    and one event its topic refuses (parked, MSG_SIZE_TOO_LARGE); the figures once drained."""
    topic = unique_topic("console")
    create_topics(kafka_bootstrap, topic, config={"max.message.bytes": str(TOPIC_LIMIT)})
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(db_url, keys=10, per_key=BACKLOG // 10,
                                              per_transaction=100)
    large = outbox.Event(topic, "big", "Large", {"blob": incompressible(200_000)})
    with psycopg.connect(db_url) as conn:
        outbox.Outbox(max_payload_bytes=1_000_000).publish(conn, large)
    ledger.record(str(large.id), "big", 0, True)
    port = free_port()
    settings = RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=kafka_bootstrap,
                             poll_interval=0.2, metrics_port=port, console_token=TOKEN)
    reader = TopicReader(kafka_bootstrap, topic)
    running = RunningConsole(port, topic, large, ledger, reader, kafka_bootstrap)
    with RelayThread(settings):
        wait_for(lambda: get(port, "/")[0] == 200, 30, "the console to answer")
        reader.read_ids(ledger.committed_ids - {str(large.id)})
        wait_for(lambda: str(large.id) in running.page(), 60, "the parked event on the page")
        yield running
    reader.close()


def test_the_page_shows_the_figures_of_a_relay_that_drained_a_backlog(
    console: RunningConsole
) -> None:
    html = console.page()
    assert figure(html, "role") == "active"
    assert figure(html, "source-state") == "connected"
    assert figure(html, "broker-state") == "connected"
    assert figure(html, "delivered") == f"{BACKLOG:,}"
    assert figure(html, "parked-count") == "1"
    assert figure(html, "backlog") == "0 event(s)"
    assert figure(html, "restarts") == "0"
    assert f"key {console.topic}/big (1)" in html
    assert "MSG_SIZE_TOO_LARGE" in html
    assert "postgresql://" not in html and "password" not in html.lower()
    # The chart's first points: the drain between the start and the next sample.
    wait_for(lambda: "<polyline" in console.page(), 30, "the events/s chart")
    peak = re.search(r"peak ([\d,.]+)/s", console.page())
    assert peak and float(peak[1].replace(",", "")) > 0


def test_redrive_is_refused_without_the_token_and_requeues_the_key_with_it(
    console: RunningConsole
) -> None:
    large_id = str(console.large.id)
    assert console.post({"id": large_id})[0] == 403
    assert console.post({"id": large_id, "token": "not-the-console-token"})[0] == 403
    assert console.post({"id": large_id}, {"Authorization": "Bearer wrong-token-1234567"})[0] == 403
    assert large_id in console.page(), "a refused redrive re-queued nothing"

    raise_topic_limit(console.bootstrap, console.topic, 400_000)  # the operator fixes the cause
    status, html = console.post({"id": large_id, "token": TOKEN})
    assert status == 200, html
    assert "re-queued 1 event(s)" in html
    console.reader.read_ids({large_id})
    wait_for(lambda: "no parked events" in console.page(), 30, "the parked list to empty")
    verdict = console.ledger.check(console.reader.drain(quiet=1.0))
    verdict.assert_holds()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless chromium (skipped, saying why, without it); screenshots go to the test's tmp
    dir, never into the repository."""
    opened = Browser(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


@pytest.mark.slow
def test_a_real_browser_shows_the_figures_and_redrives_only_with_the_token(
    browser: Browser, console: RunningConsole
) -> None:
    browser.open(console.url + "/")
    assert browser.text("#role") == "active"
    assert browser.text("#delivered") == f"{BACKLOG:,}"
    assert browser.text("#backlog") == "0 event(s)"
    assert str(console.large.id) in browser.text("#parked")
    assert browser.screenshot("console").stat().st_size > 0

    browser.click("#parked a")  # this key's redrive form
    browser.type_into("input[name=token]", "not-the-console-token")
    browser.click("button[type=submit]")
    assert "wrong or missing console token" in browser.text("#result")
    assert str(console.large.id) in console.page()

    raise_topic_limit(console.bootstrap, console.topic, 400_000)
    browser.open(f"{console.url}/redrive?id={console.large.id}")
    browser.type_into("input[name=token]", TOKEN)
    browser.click("button[type=submit]")
    assert "re-queued 1 event(s)" in browser.text("#result")
    browser.screenshot("redriven")
    console.reader.read_ids({str(console.large.id)})


def test_the_console_token_comes_from_an_option_a_variable_or_a_file_and_is_never_shown(
    tmp_path: Path
) -> None:
    base = ("--db", "postgresql://h/db", "--kafka", "k:9092", "--metrics-port", "9400")
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    for args, env in [
        (("--console-token", TOKEN), {}),
        ((), {"OUTBOX_CONSOLE_TOKEN": TOKEN}),
        (("--console-token-file", str(secret)), {}),
        ((), {"OUTBOX_CONSOLE_TOKEN_FILE": str(secret)}),
    ]:
        result = relay_cli(*base, *args, "--print-config", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["console_token"] == "***"
        assert TOKEN not in result.stdout + result.stderr
    other = tmp_path / "other"
    other.write_text("another-token-of-enough-length\n")
    both = relay_cli(*base, "--console-token", TOKEN, "--console-token-file", str(other))
    assert both.returncode == 1 and "both given" in both.stderr
    short = relay_cli(*base, "--console-token", "short")
    assert short.returncode == 1 and "at least 16 characters" in short.stderr
    no_port = relay_cli("--db", "postgresql://h/db", "--kafka", "k:9092",
                        "--console-token", TOKEN)
    assert no_port.returncode == 1 and "console_token needs metrics_port" in no_port.stderr
    help_text = relay_cli("--help", env={"COLUMNS": "250"}).stdout
    assert "OUTBOX_CONSOLE_TOKEN" in help_text and "OUTBOX_CONSOLE_TOKEN_FILE" in help_text


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Iterator[RelaySource]:
    made = make_source(request, str(request.param))
    yield made
    made.close()


def test_every_source_shows_its_figures_and_redrives_from_its_own_parked_store(
    source: RelaySource, kafka_bootstrap: str
) -> None:
    """The page of each source: its backlog gauge (the slot's WAL for postgres-wal), and the
    parked events of its own table or collection, redriven through the same code as
    `outbox parked retry`. An invalid topic name is refused for good: redriven, it comes back."""
    topic = unique_topic("console")
    create_topics(kafka_bootstrap, topic)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    events = writer.events("k", 20)
    source.write(events)
    writer.note(events, committed=True)
    misrouted = outbox.Event(topic, "m", "Misrouted", {}, topic="not a valid topic!")
    source.write([misrouted])
    port = free_port()
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(source.settings(kafka_bootstrap, metrics_port=port, console_token=TOKEN)):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: len(source.parked()) == 1, 60, "the misrouted event parked")
        wait_for(lambda: str(misrouted.id) in get(port, "/")[1], 30, "it on the page")
        html = get(port, "/")[1]
        assert figure(html, "role") == "active"
        assert figure(html, "broker-state") == "connected"
        assert figure(html, "delivered") == "20"
        assert f"key {topic}/m (1)" in html and "invalid topic" in html.lower()
        if source.name == "postgres-wal":
            assert figure(html, "slot-wal").endswith(("bytes", "KiB", "MiB"))
        assert figure(html, "backlog") == "0 event(s)"
        assert "mongodb://" not in html and "postgresql://" not in html
        running = RunningConsole(port, topic, misrouted, ledger, reader, kafka_bootstrap)
        assert running.post({"id": str(misrouted.id), "token": "wrong-token-of-length"})[0] == 403
        status, answer = running.post({"id": str(misrouted.id), "token": TOKEN})
        assert status == 200 and "re-queued 1 event(s)" in answer, answer
        wait_for(lambda: len(source.parked()) == 1 and figure(get(port, "/")[1],
                 "parked-count") == "2", 60, "the redriven event parked again")
    reader.close()

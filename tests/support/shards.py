"""Sharded relays' test helpers (polling and WAL): concurrent writers, and what the Kafka data
says about which relay run wrote each key (`--relay-id-header`)."""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from relay.shards import Survey
from tests.support.kafka import Received, TopicReader
from tests.support.ledger import Ledger
from tests.support.relays import RelayProcess, wait_for
from tests.support.writers import SequencedWriter

HEADER = "outbox-relay"


def evenly_spread(survey: Survey, units: int, relays: int) -> bool:
    """Every shard (WAL: shard group) of `units` owned, by `relays` sessions, none holding more
    than its even share."""
    per_owner: dict[int, int] = defaultdict(int)
    for pid in survey.owners.values():
        per_owner[pid] += 1
    return (len(survey.owners) == units and len(per_owner) == relays
            and max(per_owner.values()) <= -(-units // relays))


def segments(messages: list[Received]) -> dict[str, list[str]]:
    """Per key, in partition order, the relay runs that wrote it, consecutive ones merged."""
    runs: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        assert message.key is not None
        writer = message.headers[HEADER]
        if not runs[message.key] or runs[message.key][-1] != writer:
            runs[message.key].append(writer)
    return runs


def assert_no_two_writers_at_once(messages: list[Received]) -> None:
    """A relay run publishes a key's messages in one stretch: once another run wrote the key,
    the first never writes it again (it would if both published the key's shard at once)."""
    for key, runs in segments(messages).items():
        assert len(runs) == len(set(runs)), f"key {key}: relay runs interleaved: {runs}"


def wait_for_more(ledger: Ledger, events: int = 300) -> None:
    """Until the writers have written `events` more (the relays' new spread publishing)."""
    written = len(ledger.entries)
    wait_for(lambda: len(ledger.entries) >= written + events, 60, "more events written")


def kill_join_and_stop(
    start: Callable[[str], RelayProcess], spread_over: Callable[[int], bool], units: str,
    writers_url: str, topic: str, ledger: Ledger, reader: TopicReader,
) -> tuple[list[Received], list[RelayProcess]]:
    """The scale-out scenario, for either source: three relays share the `units` (shards, or
    WAL shard groups) while writers write; one is SIGKILLed, a fourth joins, one is SIGTERMed
    under load, each time the units spread over the live relays again. Returns what Kafka got
    and the two relays still running."""
    first, second, third = start("a"), start("b"), start("c")
    wait_for(lambda: spread_over(3), 60, f"the {units} over 3 relays")
    with Writers(writers_url, topic, ledger):
        reader.read_until(lambda got: len(got) >= 300, 60)
        first.kill(signal.SIGKILL)
        # The dead relay's sessions end at once, and with them its leases (and WAL: its
        # slots); the others take its units at their next look.
        wait_for(lambda: spread_over(2), 60, f"the {units} over the 2 survivors")
        wait_for_more(ledger)
        fourth = start("d")
        wait_for(lambda: spread_over(3), 60, f"the joining relay gets {units}")
        wait_for_more(ledger)
        # SIGTERM under load: the relay drains, acknowledges its source (WAL: confirms its
        # slots and closes their sessions) and only then releases its units.
        assert second.kill(signal.SIGTERM) == 0, second.log()[-2000:]
        wait_for(lambda: spread_over(2), 60, f"the {units} over the last 2")
        wait_for_more(ledger)
    reader.read_ids(ledger.committed_ids, timeout=120)
    return reader.drain(), [third, fourth]


def starter(
    processes: list[RelayProcess], args: list[str], logs: Path
) -> Callable[[str], RelayProcess]:
    """Starts relay processes with `args`, each logging to `<logs>/<name>.log`."""

    def start(name: str) -> RelayProcess:
        relay = RelayProcess(*args, log=logs / f"{name}.log").start()
        processes.append(relay)
        return relay

    return start


class Writers:
    """Threads publishing sequenced events of many keys until stopped."""

    def __init__(self, db_url: str, topic: str, ledger: Ledger, threads: int = 3) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._write, args=(db_url, topic, ledger, n))
                         for n in range(threads)]

    def _write(self, db_url: str, topic: str, ledger: Ledger, n: int) -> None:
        writer = SequencedWriter(topic, ledger)
        try:
            with psycopg.connect(db_url) as conn:
                i = 0
                while not self.stop.is_set():
                    # Keys of each thread its own (per-key sequences), 40 of them.
                    writer.write(conn, writer.events(f"w{n}-k{i % 40}", 1)
                                 + writer.events(f"w{n}-k{(i + 7) % 40}", 1))
                    i += 1
                    self.stop.wait(0.002)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not self.errors, self.errors


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    """Relay processes a test starts: closed (killed if still running) at its end."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.close()

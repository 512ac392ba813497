"""Several polling relays over a sharded outbox (relay/shards.py): shards spread over the
live relays, move when one dies or joins, and no shard is ever published by two at once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from outbox import migrate
from outbox.names import SchemaNames
from relay.poll.relay import PollConfig
from relay.settings import RelaySettings
from relay.shard_metrics import shard_probe
from relay.shards import Survey, read_survey
from tests.integration.test_ops_roles import roles_for
from tests.integration.test_ops_status_doctor import gather, outbox_cli
from tests.integration.test_relay_metrics import free_port, get, labelled, metric
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayProcess, RelayThread, wait_for
from tests.support.shards import (
    HEADER,
    assert_no_two_writers_at_once,
    evenly_spread,
    kill_join_and_stop,
    segments,
    starter,
)
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration

SHARDS = 12
LEASE = "3s"


@pytest.fixture
def sharded_url(db_url: str) -> str:
    with psycopg.connect(db_url) as conn:
        migrate.up(conn, SchemaNames(), shards=SHARDS)
    return db_url


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("shards")
    create_topics(kafka_bootstrap, name, partitions=4)
    return name


def survey(db_url: str) -> Survey:
    key = PollConfig(db_url=db_url).leader_key
    with psycopg.connect(db_url, autocommit=True) as conn:
        return read_survey(conn, SchemaNames(), key)


def spread_over(db_url: str, relays: int) -> bool:
    return evenly_spread(survey(db_url), SHARDS, relays)


def relay_args(db_url: str, bootstrap: str) -> list[str]:
    return ["--source", "postgres-poll", "--shards", "--db", db_url, "--kafka", bootstrap,
            "--shard-lease", LEASE, "--poll-interval", "0.5s", "--relay-id-header", HEADER]


def test_three_relays_one_killed_one_joining_one_stopped_lose_nothing_never_share_a_shard(
    sharded_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path,
    processes: list[RelayProcess],
) -> None:
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic)

    start = starter(processes, relay_args(sharded_url, kafka_bootstrap), tmp_path)

    try:
        delivered, running = kill_join_and_stop(
            start, lambda relays: spread_over(sharded_url, relays), "12 shards", sharded_url,
            topic, ledger, reader)
    finally:
        reader.close()
    ledger.check(delivered).assert_holds()
    assert_no_two_writers_at_once(delivered)
    # Not vacuous: shards did move, so keys were written by several runs one after another.
    assert len({m.headers[HEADER] for m in delivered}) >= 4
    assert any(len(runs) > 1 for runs in segments(delivered).values())
    for relay in running:
        assert relay.kill(signal.SIGTERM) == 0, relay.log()[-2000:]
    assert survey(sharded_url).owners == {}


def test_a_relay_alone_takes_every_shard_and_publishes_only_with_shards(
    sharded_url: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(sharded_url, keys=30, per_key=5)
    port = free_port()
    settings = RelaySettings(source="postgres-poll", db_url=sharded_url,
                             kafka_bootstrap=kafka_bootstrap, shards=True, shard_lease=2.0,
                             poll_interval=0.2, metrics_port=port)
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with RelayThread(settings):
            delivered = reader.read_ids(ledger.committed_ids)
            assert len(survey(sharded_url).owners) == SHARDS
            assert metric(get(port, "/metrics")[1], "outbox_shards_held") == SHARDS
            every = {str(shard): 0.0 for shard in range(SHARDS)}
            wait_for(lambda: labelled(get(port, "/metrics")[1], "outbox_shard_backlog_events")
                     == pending_by_shard(sharded_url) == every,
                     60, "every shard drained, on /metrics as in the table")
            held = labelled(get(port, "/metrics")[1], "outbox_shard_held")
            assert held == {shard: 1.0 for shard in every}
        ledger.check(reader.drain()).assert_holds()
    finally:
        reader.close()
    unsharded = RelayThread(RelaySettings(source="postgres-poll", db_url=sharded_url,
                                          kafka_bootstrap=kafka_bootstrap)).start()
    with pytest.raises(Exception, match=r"is sharded \(12 shards\): run every relay of it with "
                                        r"--shards"):
        unsharded.stop()
    assert delivered


def pending_by_shard(db_url: str) -> dict[str, float]:
    """Each shard's unpublished rows, counted in the table itself."""
    table = sql.Identifier(SchemaNames().schema, SchemaNames().table)
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT shard, count(*) FROM {} WHERE published_at IS NULL "
                                    "GROUP BY shard").format(table)).fetchall()
    counts = {str(shard): 0.0 for shard in range(SHARDS)}
    counts.update({str(shard): float(count) for shard, count in rows})
    return counts


def test_the_per_shard_gauges_count_each_shards_backlog_as_the_table_does(
    sharded_url: str, topic: str,
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(sharded_url, keys=30, per_key=3)
    backlog = pending_by_shard(sharded_url)
    assert sum(backlog.values()) == 90 and sum(v > 0 for v in backlog.values()) > 1
    # The probe the sharded relay registers, before any relay publishes: the backlog as it is.
    key = PollConfig(db_url=sharded_url).leader_key
    gauges = {gauge.name: gauge.values for gauge in
              shard_probe(sharded_url, SchemaNames(), key, lambda: (3,))()}
    assert gauges["shard_backlog_events"] == backlog
    assert gauges["shard_held"] == {str(s): 1.0 if s == 3 else 0.0 for s in range(SHARDS)}
    ages = gauges["shard_oldest_pending_age_seconds"]
    assert all((ages[shard] > 0) == (count > 0) for shard, count in backlog.items())


def test_shards_on_an_outbox_that_is_not_sharded_is_refused(
    db_url: str, kafka_bootstrap: str,
) -> None:
    relay = RelayThread(RelaySettings(source="postgres-poll", db_url=db_url,
                                      kafka_bootstrap=kafka_bootstrap, shards=True)).start()
    with pytest.raises(Exception, match=r"not sharded; run `outbox migrate up --db URL "
                                        r"--shards N`"):
        relay.stop()



def test_status_shows_every_shard_with_its_owner_and_backlog(
    sharded_url: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(sharded_url, keys=24, per_key=2)
    report = gather(sharded_url)
    assert report.shards is not None and report.shards.relays == 0
    assert [s.shard for s in report.shards.shards] == list(range(SHARDS))
    assert sum(s.pending for s in report.shards.shards) == 48
    assert all(s.owner_pid is None for s in report.shards.shards)
    settings = RelaySettings(source="postgres-poll", db_url=sharded_url,
                             kafka_bootstrap=kafka_bootstrap, shards=True, shard_lease=2.0,
                             poll_interval=0.2)
    with RelayThread(settings):
        def drained_and_owned() -> bool:
            shards = gather(sharded_url).shards
            return shards is not None and shards.relays == 1 and all(
                s.owner_pid is not None and s.pending == 0 for s in shards.shards)

        wait_for(drained_and_owned, 60, "one relay owning every shard, all published")
        table = outbox_cli("status", "--db", sharded_url)
        machine = outbox_cli("status", "--db", sharded_url, "--json")
    assert table.returncode == 0, table.stderr
    assert f"{SHARDS}, {SHARDS} owned, 1 relay(s) running" in table.stdout
    assert "shard 11" in table.stdout and "backlog 0" in table.stdout
    shards = json.loads(machine.stdout)["shards"]
    assert shards["relays"] == 1 and len(shards["shards"]) == SHARDS
    assert len({s["owner_pid"] for s in shards["shards"]}) == 1


def test_the_poll_relay_role_runs_a_sharded_relay(
    sharded_url: str, pg_admin_url: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(sharded_url, keys=12, per_key=3)
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with roles_for(sharded_url, pg_admin_url) as roles:
            settings = RelaySettings(source="postgres-poll", db_url=roles.url("relay_poll"),
                                     kafka_bootstrap=kafka_bootstrap, shards=True,
                                     shard_lease=2.0, poll_interval=0.2)
            with RelayThread(settings):
                delivered = reader.read_ids(ledger.committed_ids)
        ledger.check(delivered).assert_holds()
    finally:
        reader.close()


def test_a_hung_relay_loses_its_shards_after_the_lease_and_rejoins_when_it_wakes(
    sharded_url: str, kafka_bootstrap: str, tmp_path: Path, processes: list[RelayProcess],
) -> None:
    for name in ("a", "b"):  # a hung relay keeps its shards for the lease and the drain's time
        processes.append(RelayProcess(*relay_args(sharded_url, kafka_bootstrap),
                                      "--shutdown-timeout", "2", log=tmp_path / f"{name}.log")
                         .start())
    wait_for(lambda: spread_over(sharded_url, 2), 60, "12 shards over 2 relays")
    hung, alive = processes
    assert hung.process is not None
    hung.process.send_signal(signal.SIGSTOP)  # connected but silent: only the lease frees it
    try:
        wait_for(lambda: spread_over(sharded_url, 1), 60, "the live relay taking every shard")
    finally:
        hung.process.send_signal(signal.SIGCONT)
    # Awake, it finds its sessions ended, starts again and gets its share back.
    wait_for(lambda: spread_over(sharded_url, 2), 60, "the woken relay rejoining")
    assert "lost PostgreSQL" in hung.log()
    assert alive.kill(signal.SIGTERM) == 0


def test_a_standby_outlives_many_leases_and_takes_over_when_the_owner_stops(
    db_url: str, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with psycopg.connect(db_url) as conn:
        migrate.up(conn, SchemaNames(), shards=1)  # one shard: the second relay waits
    settings = RelaySettings(source="postgres-poll", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, shards=True, shard_lease=1.0,
                             shutdown_timeout=1.0, poll_interval=0.2)
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with RelayThread(settings) as owner:
            wait_for(lambda: len(survey(db_url).owners) == 1, 30, "the first relay's claim")
            with RelayThread(settings):
                wait_for(lambda: survey(db_url).relays == 2, 30, "the standby joining")
                first_owner = survey(db_url).owners[0]
                # An observation window, not a synchronisation: for four leases, with nothing
                # to publish, no session may be ended (the server would end an untouched one
                # after the lease and the shutdown timeout; the relay would restart: caplog).
                time.sleep(4 * settings.shard_lease)
                assert survey(db_url).relays == 2
                owner.stop()
                wait_for(lambda: survey(db_url).owners.get(0) not in (None, first_owner), 30,
                         "the standby taking the shard over")
                SequencedWriter(topic, ledger).write_many(db_url, keys=5, per_key=4)
                delivered = reader.read_ids(ledger.committed_ids)
        ledger.check(delivered).assert_holds()
    finally:
        reader.close()
    restarts = [r for r in caplog.records if getattr(r, "event", "") == "relay_restart"]
    assert not restarts, [r.__dict__.get("error") for r in restarts]


def test_resize_computes_every_rows_shard_again_and_is_refused_while_a_relay_runs(
    sharded_url: str, empty_db_url: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(sharded_url, keys=40, per_key=3)
    settings = RelaySettings(source="postgres-poll", db_url=sharded_url,
                             kafka_bootstrap=kafka_bootstrap, shards=True, shard_lease=2.0,
                             poll_interval=0.2)
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with RelayThread(settings):
            reader.read_ids(ledger.committed_ids)
            refused = outbox_cli("shards", "resize", "--db", sharded_url, "--shards", "5")
            assert refused.returncode == 1
            assert "1 relay(s) of public.outbox are running: stop every relay" in refused.stderr
        # Rows waiting while no relay runs: they change shards with the count.
        writer.write_many(sharded_url, keys=40, per_key=3)
        resized = outbox_cli("shards", "resize", "--db", sharded_url, "--shards", "5")
        assert resized.returncode == 0, resized.stderr
        assert f"from {SHARDS} to 5 shards" in resized.stdout
        same = outbox_cli("shards", "resize", "--db", sharded_url, "--shards", "5")
        assert same.returncode == 0 and "has 5 shards already" in same.stdout
        with psycopg.connect(sharded_url) as conn, psycopg.connect(empty_db_url) as fresh:
            assert migrate.shard_count(conn, SchemaNames()) == 5
            pending = dict(conn.execute("SELECT aggregate_id, shard FROM outbox").fetchall())
            migrate.up(fresh, SchemaNames(), shards=5)  # the same keys in a 5-shard outbox
            SequencedWriter(topic, Ledger()).write_many(empty_db_url, keys=40, per_key=1)
            expected = dict(fresh.execute("SELECT aggregate_id, shard FROM outbox").fetchall())
        assert len(pending) == 40 and pending == expected
        with RelayThread(settings):
            delivered = reader.read_ids(ledger.committed_ids)
        delivered = reader.drain()
    finally:
        reader.close()
    ledger.check(delivered).assert_holds()
    unsharded = outbox_cli("shards", "resize", "--db", empty_db_url, "--shards", "3",
                           "--table", "other")
    assert unsharded.returncode == 1 and "is not sharded" in unsharded.stderr


def test_a_relay_without_shards_on_a_sharded_outbox_and_the_reverse_are_refused(
    sharded_url: str, empty_db_url: str, kafka_bootstrap: str
) -> None:
    unsharded = outbox_cli("relay", "--source", "postgres-poll", "--db", sharded_url,
                           "--kafka", kafka_bootstrap)
    assert unsharded.returncode == 1
    assert f"is sharded ({SHARDS} shards): run every relay of it with --shards" in \
        unsharded.stderr
    with psycopg.connect(empty_db_url) as conn:
        migrate.up(conn, SchemaNames())
    sharded = outbox_cli("relay", "--source", "postgres-poll", "--shards", "--db", empty_db_url,
                         "--kafka", kafka_bootstrap)
    assert sharded.returncode == 1
    assert "--shards: table public.outbox is not sharded" in sharded.stderr


def test_roles_given_before_sharding_are_caught_by_doctor_and_named_by_the_relay(
    db_url: str, pg_admin_url: str, kafka_bootstrap: str
) -> None:
    # deploy/roles.sql run at set-up, the outbox sharded later: the polling role may not read
    # the shards table until the script runs again (docs/operations.md, "Sharded outbox").
    with roles_for(db_url, pg_admin_url) as roles:
        with psycopg.connect(db_url) as conn:
            migrate.up(conn, SchemaNames(), shards=4)
        url = roles.url("relay_poll")
        doctor = outbox_cli("doctor", "--db", url, "--kafka", kafka_bootstrap,
                            "--source", "postgres-poll")
        assert doctor.returncode == 1, doctor.stdout
        assert "lacks SELECT on public.outbox_shards" in doctor.stdout
        relay = outbox_cli("relay", "--source", "postgres-poll", "--shards", "--db", url,
                           "--kafka", kafka_bootstrap)
        assert relay.returncode == 1
        assert "may not read public.outbox_shards" in relay.stderr
        assert "deploy/roles.sql" in relay.stderr
        with psycopg.connect(db_url) as conn:
            conn.execute(f"GRANT SELECT ON outbox_shards TO {roles.name('relay_poll')}")
        again = outbox_cli("doctor", "--db", url, "--kafka", kafka_bootstrap,
                           "--source", "postgres-poll")
        assert again.returncode == 0, again.stdout

"""WAL relays over a sharded outbox (relay/wal/sharded.py, relay/wal/groups.py): one publication
and slot per shard group, groups leased and spread over the live relays as shards are for the
polling relays, a moved group streaming on from its slot, no key published by two at once."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg
import pytest

from outbox import migrate
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from relay import sources
from relay.settings import RelaySettings
from relay.shards import Survey, read_survey
from relay.wal import slots
from relay.wal.groups import catalog_filter, group_key, group_name, group_shards, setup_groups
from relay.wal.source import WalSourceConfig
from tests.integration.test_ops_roles import roles_for
from tests.integration.test_ops_status_doctor import outbox_cli
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
from tests.support.wal import unique_slot
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration

SHARDS = 12
GROUPS = 6
LEASE = "3s"


@pytest.fixture
def slot(db_url: str) -> str:
    """A sharded outbox and GROUPS shard groups (`outbox slot create --shard-groups`), named
    after the returned slot (publications alike); the database's drop drops the slots."""
    name = unique_slot("shardwal")
    with psycopg.connect(db_url) as conn:
        migrate.up(conn, SchemaNames(), shards=SHARDS)
    created = outbox_cli("slot", "create", "--db", db_url, "--slot", name, "--publication",
                         name, "--shard-groups", str(GROUPS))
    assert created.returncode == 0, created.stderr
    assert f"created {GROUPS} shard groups of {SHARDS} shards" in created.stdout
    return name


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("shardwal")
    create_topics(kafka_bootstrap, name, partitions=4)
    return name


def survey(db_url: str) -> Survey:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return read_survey(conn, SchemaNames(), group_key(SchemaNames()))


def spread_over(db_url: str, relays: int) -> bool:
    return evenly_spread(survey(db_url), GROUPS, relays)


def relay_args(db_url: str, bootstrap: str, slot: str) -> list[str]:
    return ["--source", "postgres-wal", "--shards", "--db", db_url, "--kafka", bootstrap,
            "--slot", slot, "--publication", slot, "--shard-lease", LEASE,
            "--relay-id-header", HEADER]


def settings(db_url: str, bootstrap: str, slot: str, **overrides: object) -> RelaySettings:
    values: dict[str, object] = {
        "source": "postgres-wal", "db_url": db_url, "kafka_bootstrap": bootstrap, "slot": slot,
        "publication": slot, "shards": True, "shard_lease": 2.0, "shutdown_timeout": 10.0,
        **overrides}
    return RelaySettings(**values)  # type: ignore[arg-type]


def pending_rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(row[0]) if row else -1


def test_the_groups_publications_filter_their_shards_and_each_has_a_slot(
    db_url: str, slot: str,
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for group in range(GROUPS):
            info = slots.publication_info(conn, group_name(slot, group))
            assert info is not None and len(info.tables) == 1
            assert info.tables[0].row_filter == catalog_filter(
                group_shards(SHARDS, GROUPS, group))
            assert slots.slot_status(conn, group_name(slot, group)) is not None
        assert slots.slot_status(conn, slot) is None  # no slot of the whole table
    listed = outbox_cli("slot", "status", "--db", db_url, "--slot", slot, "--publication", slot)
    assert listed.returncode == 0, listed.stderr
    assert [line.split(":")[0] for line in listed.stdout.splitlines()] == [
        f"slot {group_name(slot, group)}" for group in range(GROUPS)]
    dropped = outbox_cli("slot", "drop", "--db", db_url, "--slot", slot, "--publication", slot,
                         "--shard-groups")
    assert dropped.returncode == 0, dropped.stderr
    assert f"dropped {GROUPS} shard groups" in dropped.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert slots.publications_named(conn, f"{slot}_g") == []
        assert all(slots.slot_status(conn, group_name(slot, g)) is None for g in range(GROUPS))


def test_one_relay_streams_every_group_deletes_each_groups_rows_and_status_shows_the_slots(
    db_url: str, slot: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        port = free_port()
        with RelayThread(settings(db_url, kafka_bootstrap, slot, metrics_port=port)):
            wait_for(lambda: len(survey(db_url).owners) == GROUPS, 60, "every group claimed")
            assert metric(get(port, "/metrics")[1], "outbox_shards_held") == GROUPS
            # Transactions of many keys: each spans several groups, whose relays each delete
            # only their shards' rows of it.
            SequencedWriter(topic, ledger).write_many(db_url, keys=60, per_key=5)
            delivered = reader.read_ids(ledger.committed_ids)
            wait_for(lambda: pending_rows(db_url) == 0, 60, "every group's rows deleted")
            scraped = get(port, "/metrics")[1]
            every = {str(shard): 1.0 for shard in range(SHARDS)}
            assert labelled(scraped, "outbox_shard_held") == every
            assert labelled(scraped, "outbox_shard_backlog_events") == {k: 0.0 for k in every}
            assert set(labelled(scraped, "outbox_shard_group_retained_wal_bytes")) == {
                str(group) for group in range(GROUPS)}
            assert set(labelled(scraped, "outbox_shard_group_lag_bytes")) == {
                str(group) for group in range(GROUPS)}
            table = outbox_cli("status", "--db", db_url, "--slot", slot, "--publication", slot)
            machine = json.loads(outbox_cli("status", "--db", db_url, "--slot", slot,
                                            "--publication", slot, "--json").stdout)
        delivered = reader.drain()
    finally:
        reader.close()
    ledger.check(delivered).assert_holds()
    assert table.returncode == 0, table.stderr
    for group in range(GROUPS):
        assert f"shard group {group}" in table.stdout
        assert f"slot {group_name(slot, group)}: active" in table.stdout
    groups = machine["shard_groups"]
    assert [g["name"] for g in groups] == [group_name(slot, g) for g in range(GROUPS)]
    assert all(g["active"] and g["confirmed_flush_lsn"] for g in groups)
    assert machine["slot"] is None
    # Each shard's owner is its group's: here the one relay, for all 12.
    shards = machine["shards"]
    assert shards["relays"] == 1 and len(shards["shards"]) == SHARDS
    assert len({s["owner_pid"] for s in shards["shards"]}) == 1 and all(
        s["owner_pid"] for s in shards["shards"])
    assert f"{SHARDS}, {SHARDS} owned, 1 relay(s) running" in table.stdout


def test_the_wal_relay_role_runs_a_sharded_wal_relay(
    db_url: str, slot: str, pg_admin_url: str, kafka_bootstrap: str, topic: str,
) -> None:
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        with roles_for(db_url, pg_admin_url) as roles, RelayThread(
                settings(roles.url("relay_wal"), kafka_bootstrap, slot)):
            SequencedWriter(topic, ledger).write_many(db_url, keys=24, per_key=3)
            delivered = reader.read_ids(ledger.committed_ids)
            wait_for(lambda: pending_rows(db_url) == 0, 60, "the role deleting what it published")
        ledger.check(delivered).assert_holds()
    finally:
        reader.close()


def test_a_wal_role_that_may_not_read_the_shards_table_is_named_with_the_fix(
    db_url: str, slot: str, pg_admin_url: str, kafka_bootstrap: str,
) -> None:
    # The roles granted before the outbox was sharded (deploy/roles.sql not run again).
    with roles_for(db_url, pg_admin_url) as roles:
        with psycopg.connect(db_url) as conn:
            conn.execute(f"REVOKE SELECT ON outbox_shards FROM {roles.name('relay_wal')}")
        relay = outbox_cli("relay", *relay_args(roles.url("relay_wal"), kafka_bootstrap, slot))
        assert relay.returncode == 1
        assert "may not read public.outbox_shards" in relay.stderr
        assert "run deploy/roles.sql again after sharding" in relay.stderr


def test_three_wal_relays_one_killed_one_joining_one_stopped_lose_nothing_never_share_a_key(
    db_url: str, slot: str, kafka_bootstrap: str, topic: str, tmp_path: Path,
    processes: list[RelayProcess],
) -> None:
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic)

    start = starter(processes, relay_args(db_url, kafka_bootstrap, slot), tmp_path)

    try:
        delivered, running = kill_join_and_stop(
            start, lambda relays: spread_over(db_url, relays), "6 groups", db_url, topic,
            ledger, reader)
        wait_for(lambda: pending_rows(db_url) == 0, 60, "every published row deleted")
    finally:
        reader.close()
    verdict = ledger.check(delivered)
    verdict.assert_holds()
    assert_no_two_writers_at_once(delivered)
    # Not vacuous: groups did move, so keys were written by several runs one after another.
    assert len({m.headers[HEADER] for m in delivered}) >= 6
    assert any(len(runs) > 1 for runs in segments(delivered).values())
    # A moved group streamed on from its slot: only what was in flight at the kill came again.
    assert verdict.dup < len(ledger.committed_ids) // 2, verdict
    for relay in running:
        assert relay.kill(signal.SIGTERM) == 0, relay.log()[-2000:]
    assert survey(db_url).owners == {}


def test_without_groups_or_a_sharded_outbox_the_sharded_wal_relay_is_refused(
    db_url: str, kafka_bootstrap: str,
) -> None:
    name = unique_slot("shardwal")
    refused = outbox_cli("slot", "create", "--db", db_url, "--slot", name, "--shard-groups", "3")
    assert refused.returncode == 1
    assert "--shard-groups: table public.outbox is not sharded" in refused.stderr
    relay = RelayThread(settings(db_url, kafka_bootstrap, name)).start()
    with pytest.raises(Exception, match=r"not sharded; run `outbox migrate up --db URL "
                                        r"--shards N`"):
        relay.stop()
    with psycopg.connect(db_url) as conn:
        migrate.up(conn, SchemaNames(), shards=SHARDS)
    relay = RelayThread(settings(db_url, kafka_bootstrap, name)).start()
    with pytest.raises(Exception, match=r"no shard group of publication .* exists: create them "
                                        r"with `outbox slot create --shard-groups G`"):
        relay.stop()
    with pytest.raises(ConfigurationError, match=r"shards with on_slot_loss='recover'"):
        sources.get("postgres-wal").refuse_others(
            settings(db_url, kafka_bootstrap, name, on_slot_loss="recover"))


def test_resize_is_refused_while_groups_exist_and_a_changed_filter_is_refused(
    db_url: str, kafka_bootstrap: str, slot: str,
) -> None:
    # The groups' row filters depend on the shard column: PostgreSQL refuses to drop it.
    resized = outbox_cli("shards", "resize", "--db", db_url, "--shards", "8")
    assert resized.returncode == 1
    assert f"publication {group_name(slot, 0)} depends on column shard" in resized.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert migrate.shard_count(conn, SchemaNames()) == SHARDS
        conn.execute(f"ALTER PUBLICATION {group_name(slot, 1)} SET TABLE outbox "
                     "WHERE (shard IN (1))")
    relay = RelayThread(settings(db_url, kafka_bootstrap, slot)).start()
    with pytest.raises(Exception, match=r"publishes the rows of public.outbox where \(shard = 1\)"
                                        r", and its shard group needs"):
        relay.stop()
    with psycopg.connect(db_url, autocommit=True) as conn, pytest.raises(
            ConfigurationError, match=r"--shard-groups 13: give 1 to 12"):
        setup_groups(conn, WalSourceConfig(slot="x", publication="x"), SHARDS, 13)

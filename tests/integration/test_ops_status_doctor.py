"""`outbox status` and `outbox doctor` against set-up and wrongly set-up databases and brokers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

import outbox
from deploy.local._common import free_port
from outbox.names import SchemaNames
from relay import doctor, status
from relay.poll.relay import PollConfig
from relay.settings import RelaySettings
from relay.wal import WalSource, WalSourceConfig, setup
from tests.support.kafka import create_topics, unique_topic
from tests.support.relays import REPO, RelayThread, wait_for

pytestmark = pytest.mark.integration

# Below the local broker's default message.max.bytes (1048588) and librdkafka's (1000000),
# with room for the key and headers: the "correctly set up" case.
FITTING_PAYLOAD = 900_000


def outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def password_of(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url).get("password") or "")


def by_name(results: list[doctor.CheckResult]) -> dict[str, doctor.CheckResult]:
    return {result.name: result for result in results}


def gather(url: str, names: SchemaNames | None = None, slot: str = "outbox_relay",
           publication: str = "outbox_relay") -> status.OutboxStatus:
    names = names or SchemaNames()
    key = PollConfig(db_url=url, names=names).leader_key
    with psycopg.connect(url, autocommit=True) as conn:
        return status.gather(conn, names, leader_key=key, slot=slot, publication=publication)


@pytest.fixture
def wal_names() -> WalSourceConfig:
    suffix = uuid.uuid4().hex[:10]
    return WalSourceConfig(slot=f"ops_{suffix}", publication=f"ops_{suffix}")


@pytest.fixture
def wal_ready(db_url: str, wal_names: WalSourceConfig) -> WalSourceConfig:
    """The WAL relay's setup step done: publication and slot exist."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        setup(conn, wal_names)
    return wal_names


@pytest.fixture
def plain_role(db_url: str, pg_admin_url: str) -> Iterator[str]:
    """The URL of a login role with no privilege on the outbox at all."""
    role, password = f"plain_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
    yield psycopg.conninfo.make_conninfo(db_url, user=role, password=password)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- status -----------------------------------------------------------------------------------


def test_status_reports_backlog_parked_and_last_published(db_url: str) -> None:
    events = [outbox.Event("Order", str(n), "OrderCreated", {"n": n}) for n in range(3)]
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *events)
        # One published row kept (keep_published) and one parked event, as the relay leaves them.
        conn.execute("UPDATE outbox SET created_at = now() - interval '90 seconds'"
                     " WHERE id = %s", [events[0].id])
        conn.execute("INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
                     " published_at) VALUES (gen_random_uuid(), 'Order', '9', 'E', '', now())")
        conn.execute("INSERT INTO outbox_parked (id, aggregate_type, aggregate_id, event_type,"
                     " payload, content_type, headers, created_at, reason) VALUES"
                     " (gen_random_uuid(), 'Order', '8', 'E', '', 'application/json', '{}',"
                     " now(), 'too large')")
        conn.commit()
    report = gather(db_url)
    assert report.backlog is not None and report.backlog.pending == 3
    assert report.backlog.oldest_age_seconds is not None
    assert report.backlog.oldest_age_seconds >= 90
    assert report.parked is not None and report.parked.count == 1
    assert report.last_published is not None
    assert report.leader is None
    assert report.slot is not None and report.slot.status is None
    text = status.render(report)
    assert "3 unpublished event(s)" in text
    assert "1 event(s)" in text and "outbox parked list" in text


def test_status_shows_the_polling_relay_that_holds_the_leader_lock(
    db_url: str, kafka_bootstrap: str
) -> None:
    settings = RelaySettings(source="postgres-poll", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, poll_interval=0.2)
    with RelayThread(settings):
        wait_for(lambda: gather(db_url).leader is not None, 30, "the relay to take the lock")
        leader = gather(db_url).leader
        assert leader is not None
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                               [leader.pid]).fetchone()
        assert row is not None, "the leader pid is a live session"
    # The lock goes with the session, which the server ends a moment after the relay closed it.
    wait_for(lambda: gather(db_url).leader is None, 10, "the lock to be released")


def test_status_reports_slot_state_and_lag(db_url: str, wal_ready: WalSourceConfig) -> None:
    with psycopg.connect(db_url) as conn:
        # Incompressible, so that the WAL grows by at least its size (TOAST compresses).
        outbox.publish(conn, outbox.Event("Order", "1", "OrderCreated", os.urandom(20_000),
                                          content_type="application/octet-stream"))
        conn.commit()
    report = gather(db_url, slot=wal_ready.slot, publication=wal_ready.publication)
    assert report.slot is not None and report.slot.status is not None
    assert not report.slot.status.active
    assert report.slot.lag_bytes is not None and report.slot.lag_bytes > 10_000
    assert report.publication is not None and report.publication.covers_table
    with WalSource.open(db_url, wal_ready):
        streaming = gather(db_url, slot=wal_ready.slot, publication=wal_ready.publication)
    assert streaming.slot is not None and streaming.slot.status is not None
    assert streaming.slot.status.active and streaming.slot.status.active_pid
    as_json = status.as_json(streaming)
    assert as_json["slot"]["active"] is True
    assert as_json["slot"]["confirmed_flush_lsn"].count("/") == 1


def test_status_of_a_database_without_the_schema_says_what_to_do(empty_db_url: str) -> None:
    report = gather(empty_db_url)
    assert report.backlog is None and report.parked is None
    assert "outbox migrate up" in report.unavailable["backlog"]
    assert "does not exist" in status.render(report)


def test_status_without_read_privilege_reports_instead_of_failing(plain_role: str) -> None:
    report = gather(plain_role)
    assert "may not read public.outbox" in report.unavailable["backlog"]
    assert "may not read public.outbox_parked" in report.unavailable["parked"]


def test_status_command_prints_a_table_and_json_without_the_password(
    db_url: str, kafka_bootstrap: str
) -> None:
    table = outbox_cli("status", "--db", db_url, "--kafka", kafka_bootstrap)
    assert table.returncode == 0, table.stderr
    assert "backlog" in table.stdout and "replication slot" in table.stdout
    assert "reachable, 1 broker(s)" in table.stdout
    machine = outbox_cli("status", "--db", db_url, "--json")
    assert machine.returncode == 0, machine.stderr
    report = json.loads(machine.stdout)
    assert report["backlog"] == 0 and report["parked"] == 0
    assert report["slot"]["exists"] is False and report["kafka"] is None
    for output in (table.stdout, table.stderr, machine.stdout):
        assert password_of(db_url) not in output


def test_status_reports_an_unreachable_broker(db_url: str) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    result = outbox_cli("status", "--db", db_url, "--kafka", bootstrap, "--kafka-timeout", "2")
    assert result.returncode == 0, result.stderr
    assert f"{bootstrap}: UNREACHABLE" in result.stdout


# -- doctor: the polling relay ----------------------------------------------------------------


def test_doctor_passes_a_correct_polling_setup(db_url: str, kafka_bootstrap: str) -> None:
    topic = unique_topic("doctor")
    create_topics(kafka_bootstrap, topic, partitions=3)
    result = outbox_cli("doctor", "--db", db_url, "--kafka", kafka_bootstrap,
                        "--max-payload-bytes", str(FITTING_PAYLOAD),
                        "--topics", topic, "--partitions", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    for check in ("outbox schema", "privileges", "kafka broker", f"topic {topic}",
                  "message size"):
        assert any(line.startswith("OK") and check in line for line in lines), check
    # The local stack connects as a superuser: flagged, with the fix.
    assert any(line.startswith("WARN") and "least privilege" in line for line in lines)
    assert "deploy/roles.sql" in result.stdout
    assert password_of(db_url) not in result.stdout + result.stderr


def test_doctor_fails_without_the_outbox_schema(empty_db_url: str) -> None:
    result = outbox_cli("doctor", "--db", empty_db_url)
    assert result.returncode == 1
    assert "FAIL  outbox schema" in result.stdout
    assert "table public.outbox does not exist" in result.stdout
    assert "fix: outbox migrate up" in result.stdout


def test_doctor_fails_on_a_pending_migration(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM outbox_migrations WHERE version = 3")
        conn.commit()
    checks = by_name(doctor.run(db_url, doctor.DoctorOptions()))
    assert checks["outbox schema"].level is doctor.Level.FAIL
    assert "pending migration(s): 0003_inbox" in checks["outbox schema"].message


def test_doctor_lists_the_privileges_a_role_lacks(plain_role: str) -> None:
    checks = by_name(doctor.run(plain_role, doctor.DoctorOptions()))
    privileges = checks["privileges"]
    assert privileges.level is doctor.Level.FAIL
    assert "lacks SELECT, DELETE on public.outbox; INSERT, SELECT, UPDATE on " \
           "public.outbox_parked" in privileges.message
    assert privileges.fix is not None and 'GRANT SELECT, DELETE ON "public"."outbox"' in \
        privileges.fix
    # It cannot read the migration bookkeeping either: reported, not a crash.
    assert checks["outbox schema"].level is doctor.Level.WARN
    assert checks["least privilege"].level is doctor.Level.OK


def test_doctor_and_status_notice_a_schema_the_role_may_not_use(
    db_url: str, plain_role: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        conn.execute("GRANT SELECT ON outbox TO PUBLIC")  # useless without USAGE on the schema
        conn.commit()
    privileges = by_name(doctor.run(plain_role, doctor.DoctorOptions()))["privileges"]
    assert privileges.level is doctor.Level.FAIL
    assert "has no USAGE on schema public" in privileges.message
    assert "may not read public.outbox" in gather(plain_role).unavailable["backlog"]


def test_doctor_reports_an_unreachable_database_without_its_password(db_url: str) -> None:
    url = psycopg.conninfo.make_conninfo(db_url, port=str(free_port()))
    result = outbox_cli("doctor", "--db", url)
    assert result.returncode == 1
    assert "FAIL  database" in result.stdout and "cannot connect" in result.stdout
    assert password_of(db_url) not in result.stdout + result.stderr


# -- doctor: the WAL relay --------------------------------------------------------------------


def test_doctor_passes_a_correct_wal_setup(db_url: str, wal_ready: WalSourceConfig) -> None:
    options = doctor.DoctorOptions(source="postgres-wal", slot=wal_ready.slot,
                                   publication=wal_ready.publication)
    checks = by_name(doctor.run(db_url, options))
    for name in ("wal_level", "replication slots", "wal senders", "outbox schema",
                 "replication role", "privileges", "replication connection", "publication",
                 "replication slot"):
        assert checks[name].level is doctor.Level.OK, checks[name]
    assert "free (no relay streams from it now)" in checks["replication slot"].message
    with WalSource.open(db_url, wal_ready):
        streaming = by_name(doctor.run(db_url, options))
    assert streaming["replication slot"].level is doctor.Level.OK
    assert "in use by pid" in streaming["replication slot"].message


def test_doctor_fails_without_publication_and_slot(
    db_url: str, wal_names: WalSourceConfig
) -> None:
    result = outbox_cli("doctor", "--db", db_url, "--source", "postgres-wal",
                        "--slot", wal_names.slot, "--publication", wal_names.publication)
    assert result.returncode == 1
    assert f"FAIL  publication             publication '{wal_names.publication}' does not " \
           "exist" in result.stdout
    assert f"slot '{wal_names.slot}' does not exist" in result.stdout
    assert "pg_create_logical_replication_slot" in result.stdout


def test_doctor_fails_when_the_publication_misses_the_outbox_table(
    db_url: str, wal_names: WalSourceConfig
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE other").format(
            sql.Identifier(wal_names.publication)))
    options = doctor.DoctorOptions(source="postgres-wal", slot=wal_names.slot,
                                   publication=wal_names.publication)
    publication = by_name(doctor.run(db_url, options))["publication"]
    assert publication.level is doctor.Level.FAIL
    assert "does not publish inserts into public.outbox" in publication.message
    assert publication.fix is not None and "ADD TABLE" in publication.fix


def test_doctor_fails_for_a_role_without_replication(
    plain_role: str, wal_ready: WalSourceConfig
) -> None:
    options = doctor.DoctorOptions(source="postgres-wal", slot=wal_ready.slot,
                                   publication=wal_ready.publication)
    checks = by_name(doctor.run(plain_role, options))
    assert checks["replication role"].level is doctor.Level.FAIL
    assert "lacks the REPLICATION attribute" in checks["replication role"].message
    assert checks["replication connection"].level is doctor.Level.FAIL


# -- doctor: Kafka ----------------------------------------------------------------------------


def test_doctor_fails_when_the_broker_is_unreachable(db_url: str) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    result = outbox_cli("doctor", "--db", db_url, "--kafka", bootstrap, "--kafka-timeout", "2",
                        "--max-payload-bytes", str(FITTING_PAYLOAD), "--topics", "orders")
    assert result.returncode == 1
    assert f"FAIL  kafka broker     cannot reach {bootstrap}" in result.stdout
    assert "fix: check --kafka / OUTBOX_KAFKA_BOOTSTRAP" in result.stdout
    # Nothing more can be known about topics or limits: not reported as if checked.
    assert "topic orders" not in result.stdout and "message size" not in result.stdout


def test_doctor_fails_on_missing_topics_and_wrong_partition_counts(
    kafka_bootstrap: str,
) -> None:
    present, missing = unique_topic("doctor"), unique_topic("doctor")
    create_topics(kafka_bootstrap, present, partitions=1)
    options = doctor.DoctorOptions(topics=(present, missing), partitions=3,
                                   max_payload_bytes=FITTING_PAYLOAD)
    facts = doctor.inspect_kafka(kafka_bootstrap, topics=options.topics, timeout=10)
    checks = by_name(doctor.kafka_checks(facts, options))
    assert checks[f"topic {present}"].level is doctor.Level.FAIL
    assert "has 1 partition(s), 3 expected" in checks[f"topic {present}"].message
    assert checks[f"topic {missing}"].level is doctor.Level.FAIL
    assert "does not exist" in checks[f"topic {missing}"].message
    assert checks["message size"].level is doctor.Level.OK
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert missing not in admin.list_topics(timeout=10).topics, "checking created the topic"


def test_doctor_compares_message_limits_with_the_maximum_payload(kafka_bootstrap: str) -> None:
    small = unique_topic("doctor")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics([NewTopic(small, num_partitions=1, replication_factor=1,
                                            config={"max.message.bytes": "500000"})])
    futures[small].result(timeout=60)

    def size_check(producer_limit: str = "2000000", **kwargs: Any) -> doctor.CheckResult:
        options = doctor.DoctorOptions(**kwargs)
        settings = {"message.max.bytes": producer_limit}
        facts = doctor.inspect_kafka(kafka_bootstrap, settings, topics=options.topics)
        return by_name(doctor.kafka_checks(facts, options))["message size"]

    # librdkafka's own default (1,000,000 bytes) is below what writers accept (1 MiB).
    producer = size_check(producer_limit="1000000")
    assert producer.level is doctor.Level.FAIL
    assert "the relay's producer message.max.bytes is 1000000" in producer.message
    assert producer.fix is not None and "--kafka-setting message.max.bytes=" in producer.fix
    # A payload larger than the broker takes: the broker's limit is the narrowest.
    broker = size_check(max_payload_bytes=1_900_000)
    assert broker.level in (doctor.Level.WARN, doctor.Level.FAIL)
    assert "the broker's message.max.bytes is" in broker.message
    # A topic's own max.message.bytes is checked as well.
    topic = size_check(max_payload_bytes=FITTING_PAYLOAD, topics=(small,))
    assert topic.level is doctor.Level.FAIL
    assert f"topic {small}'s max.message.bytes is 500000" in topic.message

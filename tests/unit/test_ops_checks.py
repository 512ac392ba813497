"""The decisions of `outbox doctor` and `outbox status` on given facts (no services needed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from outbox.errors import ConfigurationError
from outbox.migrate import MigrationState, available
from relay import doctor, status
from relay.doctor import DatabaseFacts, DoctorOptions, KafkaFacts, Level, RoleFacts, TopicFacts
from relay.poll.relay import PollConfig
from relay.status import TableAccess
from relay.wal.slots import SlotStatus

FULL = TableAccess("outbox", True, True, True, True, True, False)
PARKED = TableAccess("outbox_parked", True, True, True, True, True, False)
POSITION = TableAccess("outbox_relay_position", True, True, True, True, False, False)


def facts(**changes: Any) -> DatabaseFacts:
    base = DatabaseFacts(
        database="orders",
        settings={"wal_level": "logical", "max_replication_slots": "10",
                  "max_wal_senders": "10", "max_slot_wal_keep_size": "10240"},
        slots_used=2,
        senders_used=2,
        role=RoleFacts("relay", superuser=False, replication=True, can_login=True,
                       schema_exists=True, schema_usage=True),
        tables={"outbox": FULL, "outbox_parked": PARKED, "outbox_relay_position": POSITION},
        migrations=tuple(MigrationState(m, "2024-01-01") for m in available()),
    )
    return replace(base, **changes)


def slot(**changes: Any) -> SlotStatus:
    base = SlotStatus(
        slot_name="outbox_relay", plugin="pgoutput", slot_type="logical", database="orders",
        temporary=False, active=False, active_pid=None, wal_status="reserved",
        restart_lsn=100, confirmed_flush_lsn=200, retained_bytes=0, safe_wal_size=None,
        two_phase=False)
    return replace(base, **changes)


WAL = DoctorOptions(source="postgres-wal")


def test_wal_level_other_than_logical_fails_with_the_fix() -> None:
    result = doctor.check_wal_level(facts(settings={"wal_level": "replica"}))
    assert result.level is Level.FAIL and "wal_level is replica" in result.message
    assert result.fix is not None and "wal_level = logical" in result.fix


def test_unbounded_wal_retention_is_a_warning() -> None:
    unbounded = facts(settings={"max_slot_wal_keep_size": "-1"})
    assert doctor.check_wal_keep_size(unbounded).level is Level.WARN
    assert doctor.check_wal_keep_size(facts()).level is Level.OK
    assert doctor.check_wal_keep_size(facts(settings={})).level is Level.WARN  # before PG 13


def test_replication_slot_room_is_needed_only_until_the_slot_exists() -> None:
    full = facts(slots_used=10)
    assert doctor.check_replication_slots(full, WAL).level is Level.FAIL
    assert doctor.check_replication_slots(replace(full, slot=slot()), WAL).level is Level.OK
    assert doctor.check_replication_slots(facts(), WAL).level is Level.OK


def test_wal_senders_need_room_for_the_relay_and_a_reconnect() -> None:
    assert doctor.check_wal_senders(facts(senders_used=10)).level is Level.FAIL
    assert doctor.check_wal_senders(facts(senders_used=9)).level is Level.WARN
    assert doctor.check_wal_senders(facts(senders_used=8)).level is Level.OK
    streaming = facts(senders_used=9, slot=slot(active=True, active_pid=7))
    assert doctor.check_wal_senders(streaming).level is Level.OK


def test_keep_published_privilege_missing_is_only_a_warning() -> None:
    no_update = replace(FULL, update=False)
    result = doctor.check_table_privileges(
        facts(tables={"outbox": no_update, "outbox_parked": PARKED}), DoctorOptions())
    assert result is not None and result.level is Level.WARN
    assert "keep-published" in result.message


def test_wal_relay_needs_delete_on_the_outbox_to_remove_what_it_published() -> None:
    no_delete = replace(FULL, delete=False, update=False)
    tables = {"outbox": no_delete, "outbox_parked": PARKED, "outbox_relay_position": POSITION}
    result = doctor.check_table_privileges(facts(tables=tables), WAL)
    assert result is not None and result.level is Level.FAIL
    assert "lacks DELETE on public.outbox" in result.message
    assert "outbox_relay_wal" in (result.fix or "")
    updates_not_needed = {"outbox": replace(FULL, update=False), "outbox_parked": PARKED,
                          "outbox_relay_position": POSITION}
    result = doctor.check_table_privileges(facts(tables=updates_not_needed), WAL)
    assert result is not None and result.level is Level.OK


def test_wal_relay_needs_to_record_its_position() -> None:
    read_only = {"outbox": FULL, "outbox_parked": PARKED,
                 "outbox_relay_position": replace(POSITION, insert=False, update=False)}
    result = doctor.check_table_privileges(facts(tables=read_only), WAL)
    assert result is not None and result.level is Level.FAIL
    assert "lacks INSERT, UPDATE on public.outbox_relay_position" in result.message
    assert 'GRANT INSERT, UPDATE ON "public"."outbox_relay_position"' in (result.fix or "")
    # The polling relay has no position to record.
    result = doctor.check_table_privileges(facts(tables=read_only), DoctorOptions())
    assert result is not None and result.level is Level.OK


def test_missing_schema_usage_fails_before_table_privileges() -> None:
    role = RoleFacts("relay", False, False, True, schema_exists=True, schema_usage=False)
    result = doctor.check_table_privileges(facts(role=role), DoctorOptions())
    assert result is not None and result.level is Level.FAIL
    assert result.fix == 'GRANT USAGE ON SCHEMA "public" TO "relay" ' \
                         "(deploy/roles.sql: role outbox_relay_poll)"


def test_superuser_or_owner_is_warned_about() -> None:
    superuser = facts(role=replace(facts().role, superuser=True))
    assert doctor.check_least_privilege(superuser, DoctorOptions()).level is Level.WARN
    owner = facts(tables={"outbox": replace(FULL, owned=True), "outbox_parked": PARKED})
    result = doctor.check_least_privilege(owner, DoctorOptions())
    assert result.level is Level.WARN and "could drop it" in result.message
    assert doctor.check_least_privilege(facts(), DoctorOptions()).level is Level.OK


def test_slot_states() -> None:
    lost = doctor.check_slot(facts(slot=slot(wal_status="lost")), WAL)
    assert lost.level is Level.FAIL and "invalidated" in lost.message
    other_db = doctor.check_slot(facts(slot=slot(database="billing")), WAL)
    assert other_db.level is Level.FAIL and "belongs to database 'billing'" in other_db.message
    physical = doctor.check_slot(facts(slot=slot(slot_type="physical", plugin=None)), WAL)
    assert physical.level is Level.FAIL
    behind = doctor.check_slot(facts(slot=slot(wal_status="unreserved")), WAL)
    assert behind.level is Level.WARN and "about to be invalidated" in behind.message
    busy = doctor.check_slot(facts(slot=slot(active=True, active_pid=42), current_lsn=1224), WAL)
    assert busy.level is Level.OK and "in use by pid 42" in busy.message
    assert "1024 bytes" in busy.message  # current 1224 - confirmed 200


def kafka(**changes: Any) -> KafkaFacts:
    base = KafkaFacts("b:9092", brokers=1,
                      broker_config={"message.max.bytes": "2000000",
                                     "auto.create.topics.enable": "false",
                                     "num.partitions": "1"},
                      producer_max_bytes=2_000_000)
    return replace(base, **changes)


@pytest.mark.parametrize(("limit", "level"), [
    (1_048_576 + doctor.RECORD_OVERHEAD_BYTES, Level.OK),
    (1_048_576 + 100, Level.WARN),
    (1_048_575, Level.FAIL),
])
def test_message_size_thresholds(limit: int, level: Level) -> None:
    result = doctor.check_message_size(kafka(producer_max_bytes=limit), DoctorOptions())
    assert result.level is level


def test_unreadable_broker_configuration_is_a_warning() -> None:
    unknown = kafka(broker_config={}, config_error="Broker: Cluster authorization failed")
    result = doctor.check_message_size(unknown, DoctorOptions())
    assert result.level is Level.WARN and "authorization failed" in result.message


def test_missing_topic_with_auto_creation_is_a_warning_if_the_partitions_fit() -> None:
    auto = kafka(broker_config={"auto.create.topics.enable": "true", "num.partitions": "3",
                                "message.max.bytes": "2000000"})
    fits = DoctorOptions(topics=("orders",), partitions=3)
    assert doctor.check_topics(auto, fits)[0].level is Level.WARN
    wrong = DoctorOptions(topics=("orders",), partitions=6)
    assert doctor.check_topics(auto, wrong)[0].level is Level.FAIL
    present = kafka(topics={"orders": TopicFacts("orders", True, 6)})
    assert doctor.check_topics(present, wrong)[0].level is Level.OK


def test_without_a_broker_kafka_is_reported_unchecked() -> None:
    assert [r.level for r in doctor.kafka_checks(None, DoctorOptions())] == [Level.WARN]


def test_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="source='mongo-poll'"):
        DoctorOptions(source="mongo-poll")
    with pytest.raises(ConfigurationError, match="needs the topics"):
        DoctorOptions(partitions=3)
    with pytest.raises(ConfigurationError, match="not topic names"):
        DoctorOptions(topics=("no spaces",))
    with pytest.raises(ConfigurationError):
        DoctorOptions(source="postgres-wal", slot="Upper")


def test_render_puts_the_fix_under_each_problem_and_redacts() -> None:
    results = [
        doctor.CheckResult("database", Level.FAIL,
                           "cannot connect: postgresql://relay:s3cret@db/orders", "check --db"),
        doctor.CheckResult("kafka broker", Level.OK, "fine", "never shown"),
    ]
    text = doctor.render(results)
    assert "s3cret" not in text
    assert text.splitlines() == [
        "FAIL  database      cannot connect: postgresql://relay:***@db/orders",
        "                    fix: check --db",
        "OK    kafka broker  fine",
        "1 OK, 0 WARN, 1 FAIL",
    ]
    assert doctor.failed(results)


def test_leader_lock_key_splits_as_pg_locks_shows_it() -> None:
    key = PollConfig(db_url="postgresql://x").leader_key
    classid, objid = status.leader_lock_parts(key)
    assert (classid << 32 | objid) == key & 0xFFFF_FFFF_FFFF_FFFF
    assert status.leader_lock_parts(-1) == (0xFFFF_FFFF, 0xFFFF_FFFF)
    assert status.leader_lock_parts(5) == (0, 5)


def test_status_rendering_of_ages_and_sizes() -> None:
    now = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)
    report = status.OutboxStatus(
        database="orders on db:5432 as relay", schema="public", table="outbox",
        backlog=status.Backlog(12, 3725.0),
        parked=status.ParkedSummary(0, None),
        slot=status.SlotReport("outbox_relay", slot(confirmed_flush_lsn=0x16_0000_0000),
                               0x16_0000_0000 + 3 * 1024 * 1024),
    )
    lines = dict(status.rows(report, now))
    assert lines["backlog"] == "12 unpublished event(s)"
    assert lines["oldest pending"] == "62.1m old"
    assert lines["slot lag"] == "3.0 MiB"
    assert lines["confirmed flush LSN"] == "16/0"
    assert lines["last published"].startswith("- (no published row kept")

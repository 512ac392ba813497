"""`outbox verify`'s pure parts: the ledger verdict, the plan and its faults, the rights check,
the child relay's environment and the printed report."""

from __future__ import annotations

import pytest

from outbox.errors import ConfigurationError
from relay.verify.ledger import Ledger
from relay.verify.mongo import scratch_url
from relay.verify.plan import KafkaAccess, ScratchNames, VerifyPlan, parse_faults
from relay.verify.privileges import VerifyFacts, missing
from relay.verify.relayproc import relay_environment
from relay.verify.run import EXIT_HELD, EXIT_INTERRUPTED, EXIT_NOT_HELD, Recovery, Report


def ledger_of(*entries: tuple[str, str, int, bool]) -> Ledger:
    ledger = Ledger()
    for event_id, key, seq, committed in entries:
        ledger.record(event_id, key, seq, committed)
    return ledger


def test_everything_delivered_once_in_order_holds() -> None:
    ledger = ledger_of(("a", "k1", 0, True), ("b", "k1", 1, True), ("c", "k2", 0, True))
    verdict = ledger.check(["a", "c", "b"])
    assert verdict.held
    assert (verdict.committed, verdict.delivered, verdict.keys) == (3, 3, 2)


def test_a_missing_committed_event_is_lost() -> None:
    verdict = ledger_of(("a", "k", 0, True), ("b", "k", 1, True)).check(["a"])
    assert (verdict.lost, verdict.lost_examples) == (1, ["b"])
    assert not verdict.held
    assert "1 committed event(s) never delivered, e.g. b" in verdict.reasons()


def test_a_rolled_back_or_unknown_event_in_kafka_is_phantom() -> None:
    verdict = ledger_of(("a", "k", 0, True), ("r", "k", 1, False)).check(["a", "r", "x"])
    assert verdict.phantom == 2
    assert verdict.rolled_back == 1
    assert not verdict.held


def test_redelivered_older_events_are_duplicates_not_disorder() -> None:
    ledger = ledger_of(("a", "k", 0, True), ("b", "k", 1, True), ("c", "k", 2, True))
    verdict = ledger.check(["a", "b", "a", "b", "c"])
    assert verdict.held
    assert verdict.dup == 2


def test_a_key_whose_first_deliveries_go_backwards_breaks_order() -> None:
    verdict = ledger_of(("a", "k", 0, True), ("b", "k", 1, True)).check(["b", "a"])
    assert verdict.disordered_keys == ["k"]
    assert not verdict.held


def test_an_event_whose_commit_was_in_doubt_is_neither_lost_nor_phantom() -> None:
    ledger = ledger_of(("a", "k", 0, True))
    ledger.doubt("d", "k", 1)
    assert ledger.check(["a"]).held
    assert ledger.check(["a", "d"]).held
    assert ledger.check(["a"]).in_doubt == 1


def test_faults_are_parsed_in_order_without_repeats_and_unknown_ones_refused() -> None:
    assert parse_faults("relay-stop, relay-kill,relay-stop") == ("relay-stop", "relay-kill")
    assert parse_faults("") == ()
    with pytest.raises(ConfigurationError, match="unknown fault.*relay-crash"):
        parse_faults("relay-crash")


def test_each_fault_asked_for_comes_inside_the_writing_time() -> None:
    plan = VerifyPlan("postgres-poll", 12.0, 100.0, ("relay-kill", "relay-stop",
                                                      "connection-drop"))
    times = plan.fault_times()
    assert [fault for _, fault in times] == ["relay-kill", "relay-stop", "connection-drop"]
    assert all(0.1 * 12 < at < 0.85 * 12 for at, _ in times)
    assert [at for at, _ in times] == sorted(at for at, _ in times)


def test_a_long_run_repeats_the_faults() -> None:
    plan = VerifyPlan("postgres-wal", 80.0, 100.0, ("relay-kill",))
    assert len(plan.fault_times()) == 10


@pytest.mark.parametrize(("source", "duration", "rate", "message"), [
    ("mysql", 10.0, 10.0, "is not one of"),
    ("postgres-poll", 0.5, 10.0, "--duration"),
    ("postgres-poll", 10.0, 0.0, "--rate"),
])
def test_a_bad_plan_is_refused(source: str, duration: float, rate: float, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        VerifyPlan(source, duration, rate)


def test_connection_drop_is_for_the_postgres_sources_only() -> None:
    with pytest.raises(ConfigurationError, match="connection-drop .* does not apply to mongo"):
        VerifyPlan("mongo-stream", 10.0, 10.0, ("relay-kill", "connection-drop"))
    assert VerifyPlan("postgres-wal", 10.0, 10.0, ("connection-drop",)).faults


def test_a_mongodb_long_transaction_ends_within_the_servers_limit() -> None:
    start, end = VerifyPlan("mongo-poll", 600.0, 10.0).long_transaction()
    assert end - start <= 30
    assert VerifyPlan("postgres-poll", 600.0, 10.0).long_transaction() == (30.0, 450.0)


def test_the_mongodb_scratch_database_replaces_the_urls_own() -> None:
    url = "mongodb://u:p@h1:27017,h2:27017/orders?replicaSet=rs&tls=true"
    assert scratch_url(url, "outbox_verify_x") == (
        "mongodb://u:p@h1:27017,h2:27017/outbox_verify_x?replicaSet=rs&tls=true")
    assert scratch_url("mongodb://h", "d") == "mongodb://h/d"


def test_scratch_names_are_the_runs_own_and_never_the_apps() -> None:
    names = ScratchNames(suffix="abc")
    schema_names = names.schema_names
    assert schema_names.table == "outbox_verify_abc"
    assert schema_names.inbox_table == "outbox_verify_abc_inbox"
    assert names.slot == names.publication == "outbox_verify_abc"
    assert names.topic == "outbox-verify-abc"
    assert ScratchNames().suffix != ScratchNames().suffix


def facts(**changes: object) -> VerifyFacts:
    base: dict[str, object] = dict(
        role="relay", database="app", superuser=False, replication=True, schema_exists=True,
        schema_usage=True, schema_create=True, database_create=True,
        migrations_table_exists=True, migrations_select=True, migrations_insert=True,
        migrations_delete=True,
        settings={"wal_level": "logical", "max_replication_slots": "10",
                  "max_wal_senders": "10"},
        slots_used=1, senders_used=1)
    base.update(changes)
    return VerifyFacts(**base)  # type: ignore[arg-type]


def test_a_role_with_every_right_may_verify_both_sources() -> None:
    names = ScratchNames().schema_names
    assert missing(facts(), names, wal=True) == []
    assert missing(facts(replication=False), names, wal=False) == []


def test_each_missing_right_is_named_with_its_grant() -> None:
    names = ScratchNames().schema_names
    found = missing(facts(schema_create=False, database_create=False, replication=False,
                          migrations_insert=False), names, wal=True)
    text = "\n".join(found)
    assert 'GRANT USAGE, CREATE ON SCHEMA "public" TO "relay"' in text
    assert 'GRANT CREATE ON DATABASE "app" TO "relay"' in text
    assert 'ALTER ROLE "relay" WITH REPLICATION' in text
    assert 'GRANT SELECT, INSERT, DELETE ON "public"."outbox_migrations" TO "relay"' in text
    assert len(found) == 4


def test_the_server_settings_the_wal_source_needs_are_checked() -> None:
    names = ScratchNames().schema_names
    found = missing(facts(settings={"wal_level": "replica", "max_replication_slots": "2",
                                    "max_wal_senders": "3"}, slots_used=2, senders_used=2),
                    names, wal=True)
    assert [line.split(" ")[0] for line in found] == ["wal_level", "no", "fewer"]


def test_the_child_relay_reads_no_setting_of_the_apps_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_TABLE", "orders_outbox")
    monkeypatch.setenv("OUTBOX_CONFIG", "/etc/outbox/relay.toml")
    monkeypatch.setenv("OUTBOX_METRICS_PORT", "9100")
    names = ScratchNames(suffix="s1")
    kafka = KafkaAccess("k:9092", (("security.protocol", "SASL_SSL"), ("sasl.username", "u")))
    env = relay_environment("postgres-poll", "postgresql://u:p@h/db", kafka, names)
    assert env["OUTBOX_TABLE"] == "outbox_verify_s1"
    assert "OUTBOX_CONFIG" not in env and "OUTBOX_METRICS_PORT" not in env
    assert "OUTBOX_SLOT" not in env  # a poll relay warns about WAL settings
    assert "application_name=outbox-verify-relay-s1" in env["OUTBOX_DB_URL"]
    assert env["OUTBOX_KAFKA_BOOTSTRAP"] == "k:9092"
    assert env["OUTBOX_KAFKA_SETTINGS"] == "security.protocol=SASL_SSL sasl.username=u"
    wal = relay_environment("postgres-wal", "postgresql://u:p@h/db", KafkaAccess("k"), names)
    assert wal["OUTBOX_SLOT"] == wal["OUTBOX_PUBLICATION"] == "outbox_verify_s1"
    mongo = relay_environment("mongo-stream", "mongodb://h/app", KafkaAccess("k"), names)
    assert mongo["OUTBOX_MONGO_URL"] == "mongodb://h/outbox_verify_s1"
    assert mongo["OUTBOX_COLLECTIONS"] == "aggregates"
    assert "OUTBOX_DB_URL" not in mongo and "OUTBOX_TABLE" not in mongo


def test_kafka_settings_reach_verifys_clients_and_bad_ones_are_refused() -> None:
    kafka = KafkaAccess("k:9092", (("security.protocol", "SSL"), ("linger.ms", "5")))
    config = kafka.client_config()
    assert config["bootstrap.servers"] == "k:9092"
    assert config["security.protocol"] == "SSL"
    assert "enable.idempotence" not in config  # producer guarantees mean nothing here
    with pytest.raises(ConfigurationError, match="enable.idempotence"):
        KafkaAccess("k:9092", (("enable.idempotence", "false"),))
    with pytest.raises(ConfigurationError, match="spaces"):
        KafkaAccess("k:9092", (("sasl.password", "a b"),))


def test_the_report_passes_only_when_the_ledger_holds_and_nothing_went_wrong() -> None:
    plan = VerifyPlan("postgres-poll", 10.0, 100.0, ("relay-kill",))
    names = ScratchNames(suffix="r")
    ledger = ledger_of(("a", "k", 0, True))
    report = Report(plan, names, verdict=ledger.check(["a"]), relay_starts=2,
                    recoveries=[Recovery("relay-kill", 3.0, took=1.25),
                                Recovery("relay-kill", 6.0, took=0.5)])
    assert report.exit_code == EXIT_HELD
    text = report.render()
    assert "slowest recovery 1.25 s (relay-kill at 3.0 s)" in text
    assert "verdict: PASS" in text
    report.problems.append("writer 1: connection refused")
    assert report.exit_code == EXIT_NOT_HELD
    assert "  - writer 1: connection refused" in report.render()
    lost = Report(plan, names, verdict=ledger.check([]))
    assert lost.exit_code == EXIT_NOT_HELD
    assert "never delivered" in lost.render()
    assert Report(plan, names, interrupted=True).exit_code == EXIT_INTERRUPTED

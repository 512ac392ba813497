"""deploy/roles.sql applied with psql: each role can do its job and nothing more."""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from relay import doctor
from relay import main as relay_main
from relay.errors import FatalRelayError
from relay.settings import RelaySettings
from relay.wal import WalEvent, WalSource, WalSourceConfig, setup
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.relays import RelayThread, wait_for
from tests.support.wal import recorded_position

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "roles.sql"
KINDS = ("app", "relay_poll", "relay_wal", "consumer")


def find_psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    # The local stack runs Debian's server packages, whose client is not on PATH.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"),
                        key=lambda p: int(Path(p).parent.parent.name))
    return candidates[-1] if candidates else None


def apply_roles(url: str, **variables: str) -> subprocess.CompletedProcess[str]:
    psql = find_psql()
    if psql is None:
        pytest.skip("psql is not installed: roles.sql needs psql's variables and \\gexec")
    args = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    return subprocess.run([*args, "-f", str(SCRIPT), url], capture_output=True, text=True,
                          timeout=60)


@dataclass
class Roles:
    db_url: str
    prefix: str
    password: str

    def name(self, kind: str) -> str:
        return f"{self.prefix}_{kind}"

    def url(self, kind: str) -> str:
        return psycopg.conninfo.make_conninfo(
            self.db_url, user=self.name(kind), password=self.password)

    def connect(self, kind: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(kind), **kwargs)


def drop_roles(db_url: str, admin_url: str, prefix: str) -> None:
    names = [sql.Identifier(f"{prefix}_{kind}") for kind in KINDS]
    with psycopg.connect(db_url, autocommit=True) as conn:
        existing = {row[0] for row in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", [f"{prefix}\\_%"])}
        names = [n for n, kind in zip(names, KINDS, strict=True)
                 if f"{prefix}_{kind}" in existing]
        if names:
            # Revokes the grants in this database (the only one they were given in).
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.SQL(", ").join(names)))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(name))


@contextlib.contextmanager
def roles_for(db_url: str, pg_admin_url: str, **variables: str) -> Iterator[Roles]:
    # Roles are cluster-wide: a prefix of this test's own keeps parallel runs apart.
    prefix = f"t{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    passwords = {f"{kind}_password": password for kind in ("app", "poll", "wal", "consumer")}
    try:
        result = apply_roles(db_url, prefix=prefix, **passwords, **variables)
        assert result.returncode == 0, result.stderr
        yield Roles(db_url, prefix, password)
    finally:
        drop_roles(db_url, pg_admin_url, prefix)


@pytest.fixture
def roles(db_url: str, pg_admin_url: str) -> Iterator[Roles]:
    with roles_for(db_url, pg_admin_url) as created:
        yield created


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("roles")
    create_topics(kafka_bootstrap, name)
    return name


def denied(conn: psycopg.Connection[Any], statement: str) -> bool:
    """Whether `statement` fails for lack of privilege (the transaction is rolled back)."""
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return True
    conn.rollback()
    return False


def test_roles_have_the_attributes_they_need_and_no_more(roles: Roles) -> None:
    with psycopg.connect(roles.db_url) as conn:
        rows = conn.execute(
            "SELECT rolname, rolsuper, rolreplication, rolcreaterole, rolcreatedb, rolbypassrls,"
            " rolcanlogin FROM pg_roles WHERE rolname LIKE %s", [f"{roles.prefix}\\_%"]
        ).fetchall()
    attributes = {row[0]: row[1:] for row in rows}
    assert set(attributes) == {roles.name(kind) for kind in KINDS}
    for name, (superuser, replication, createrole, createdb, bypassrls, login) in (
        attributes.items()
    ):
        assert login and not (superuser or createrole or createdb or bypassrls), name
        assert replication == (name == roles.name("relay_wal")), name


def test_running_the_script_again_changes_nothing(roles: Roles) -> None:
    again = apply_roles(roles.db_url, prefix=roles.prefix)
    assert again.returncode == 0, again.stderr
    with roles.connect("app") as conn:  # the password set the first time still works
        outbox.publish(conn, outbox.Event("Order", "1", "OrderCreated", {}))
        conn.commit()


def test_app_role_publishes_but_cannot_read_or_delete_events(roles: Roles) -> None:
    event = outbox.Event("Order", "42", "OrderCreated", {"orderId": 42})
    with roles.connect("app") as conn:
        assert outbox.publish(conn, event) == [event.id]
        conn.commit()
        assert denied(conn, "SELECT * FROM outbox")
        assert denied(conn, "DELETE FROM outbox")
        assert denied(conn, "SELECT * FROM outbox_parked")
        assert denied(conn, "INSERT INTO outbox_inbox (consumer, event_id)"
                            " VALUES ('c', gen_random_uuid())")
    with psycopg.connect(roles.db_url) as conn:
        assert conn.execute("SELECT id FROM outbox").fetchall() == [(event.id,)]


def test_app_role_numbers_events_but_cannot_touch_the_consumers_numbers(roles: Roles) -> None:
    sequenced = outbox.Outbox(sequence=True)
    with roles.connect("app") as conn:
        sequenced.publish(conn, outbox.Event("Order", "42", "OrderCreated", {}))
        # Four events: the binary COPY path.
        sequenced.publish(conn, *[outbox.Event("Order", "42", "OrderChanged", {})
                                  for _ in range(4)])
        conn.commit()
        assert denied(conn, "DELETE FROM outbox_sequence")
        assert denied(conn, "SELECT * FROM outbox_inbox_sequence")
    with psycopg.connect(roles.db_url) as conn:
        numbers = conn.execute("SELECT headers->>'sequence' FROM outbox ORDER BY position")
        assert [n for (n,) in numbers] == ["1", "2", "3", "4", "5"]


def test_app_role_writes_table_less_events_without_replication(roles: Roles) -> None:
    messages = outbox.Outbox(mode="message")
    with roles.connect("app") as conn:
        messages.publish(conn, outbox.Event("Order", "7", "OrderCreated", {}))
        conn.commit()


def test_poll_relay_role_publishes_and_parks_events(
    roles: Roles, kafka_bootstrap: str, topic: str
) -> None:
    good = [outbox.Event(topic, str(n), "OrderCreated", {"n": n}) for n in range(5)]
    misrouted = outbox.Event(topic, "x", "Misrouted", {}, topic="not a valid topic!")
    with roles.connect("app") as conn:
        outbox.publish(conn, *good, misrouted)
        conn.commit()
    reader = TopicReader(kafka_bootstrap, topic)
    settings = RelaySettings(source="postgres-poll", db_url=roles.url("relay_poll"),
                             kafka_bootstrap=kafka_bootstrap, poll_interval=0.2)
    with RelayThread(settings):
        reader.read_ids({str(e.id) for e in good})

        def outbox_empty() -> bool:
            with psycopg.connect(roles.db_url) as conn:
                return conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)

        wait_for(outbox_empty, 30, "the relay to delete the published rows")
    reader.close()
    with psycopg.connect(roles.db_url) as conn:
        parked = conn.execute("SELECT id FROM outbox_parked").fetchall()
    assert parked == [(misrouted.id,)]


def test_poll_relay_sessions_are_dropped_soon_after_their_host_vanishes(roles: Roles) -> None:
    with roles.connect("relay_poll") as conn:
        shown = [conn.execute(f"SHOW tcp_keepalives_{name}").fetchone()
                 for name in ("idle", "interval", "count")]
    assert shown == [("30",), ("10",), ("3",)]


def test_poll_relay_role_cannot_drop_write_or_read_other_tables(roles: Roles) -> None:
    with psycopg.connect(roles.db_url) as admin:
        admin.execute("CREATE TABLE orders (id int PRIMARY KEY, secret text)")
        admin.commit()
    with roles.connect("relay_poll") as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        # Owner-only statements report "must be owner", SQLSTATE 42501 like any other denial.
        assert denied(conn, "DROP TABLE outbox")
        assert denied(conn, "TRUNCATE outbox")
        assert denied(conn, "ALTER TABLE outbox ADD COLUMN x int")
        assert denied(conn, "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type,"
                            " payload) VALUES (gen_random_uuid(), 'a', '1', 'e', '')")
        assert denied(conn, "SELECT * FROM orders")
        assert denied(conn, "SELECT * FROM outbox_inbox")
        assert denied(conn, "DELETE FROM outbox_parked")
        assert denied(conn, "CREATE TABLE mine (id int)")


def test_wal_relay_role_streams_without_superuser_but_cannot_set_up(roles: Roles) -> None:
    suffix = uuid.uuid4().hex[:8]
    config = WalSourceConfig(slot=f"roles_{suffix}", publication=f"roles_{suffix}")
    with roles.connect("relay_wal", replication="database", autocommit=True) as conn:
        identity = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert identity is not None and identity[3] == psycopg.conninfo.conninfo_to_dict(
            roles.db_url)["dbname"]
    with roles.connect("relay_wal", autocommit=True) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert superuser.fetchone() == (False,)
        # The publication is the table owner's to create: setup is an administrator's step.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE outbox").format(
                sql.Identifier(config.publication)))
    with psycopg.connect(roles.db_url, autocommit=True) as admin:
        setup(admin, config)
    event = outbox.Event("Order", "1", "OrderCreated", {})
    with roles.connect("app") as conn:
        outbox.publish(conn, event)
        conn.commit()
    with WalSource.open(roles.url("relay_wal"), config) as source:
        seen: list[Any] = []

        def event_read() -> bool:
            seen.extend(source.poll(timeout=0.2))
            return any(isinstance(item, WalEvent) and item.record.id == event.id
                       for item in seen)

        wait_for(event_read, 30, "the event from the slot")


@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep-published"])
def test_wal_relay_role_publishes_removes_its_rows_and_parks(
    roles: Roles, kafka_bootstrap: str, topic: str, keep: bool
) -> None:
    suffix = uuid.uuid4().hex[:8]
    config = WalSourceConfig(slot=f"roles_{suffix}", publication=f"roles_{suffix}")
    with psycopg.connect(roles.db_url, autocommit=True) as admin:
        setup(admin, config)
    good = [outbox.Event(topic, str(n), "OrderCreated", {"n": n}) for n in range(5)]
    misrouted = outbox.Event(topic, "x", "Misrouted", {}, topic="not a valid topic!")
    with roles.connect("app") as conn:
        outbox.publish(conn, *good, misrouted)
        conn.commit()
    reader = TopicReader(kafka_bootstrap, topic)
    settings = RelaySettings(
        source="postgres-wal", db_url=roles.url("relay_wal"), kafka_bootstrap=kafka_bootstrap,
        slot=config.slot, publication=config.publication,
        keep_published=dt.timedelta(days=1) if keep else None)

    def unpublished_rows() -> int:
        with psycopg.connect(roles.db_url) as conn:
            row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            return int((row.fetchone() or (-1,))[0])

    with RelayThread(settings):
        reader.read_ids({str(e.id) for e in good})
        wait_for(lambda: unpublished_rows() == 0, 30, "the relay to remove its published rows")
    reader.close()
    with psycopg.connect(roles.db_url) as conn:
        kept = conn.execute("SELECT count(*) FROM outbox").fetchone()
        parked = conn.execute("SELECT id FROM outbox_parked").fetchall()
        topics = conn.execute(
            "SELECT DISTINCT topic FROM outbox WHERE published_at IS NOT NULL ORDER BY 1"
        ).fetchall()
    assert kept == ((6,) if keep else (0,))
    assert parked == [(misrouted.id,)]
    # Each kept row names where its event went (the parked one: its own topic, as written).
    assert topics == (sorted([(topic,), (misrouted.topic,)]) if keep else [])
    recorded = recorded_position(roles.db_url, config.slot)  # written with the role's rights
    assert recorded is not None and recorded.lsn is not None and recorded.system is not None
    with roles.connect("relay_wal") as conn:  # DELETE, UPDATE (published_at, commit_lsn, topic)
        assert denied(conn, "UPDATE outbox SET payload = ''")
        assert denied(conn, "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type,"
                            " payload) VALUES (gen_random_uuid(), 'a', '1', 'e', '')")


@pytest.mark.parametrize(("privilege", "table", "keep", "message"), [
    ("DELETE", "outbox", None, r"may not DELETE .*outbox.*deploy/roles.sql"),
    ("INSERT", "outbox_relay_position", None,
     r"may not INSERT .*outbox_relay_position.*acknowledged.*deploy/roles.sql"),
    # --keep-published stores the topic each event was sent to in its kept row.
    ("UPDATE (topic)", "outbox", dt.timedelta(days=1),
     r"may not UPDATE .*outbox\" \(topic\).*deploy/roles.sql"),
], ids=["delete-outbox", "insert-position", "update-topic-keep-published"])
def test_wal_relay_without_its_rights_fails_at_start_up(
    roles: Roles, kafka_bootstrap: str, privilege: str, table: str, keep: dt.timedelta | None,
    message: str,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    config = WalSourceConfig(slot=f"roles_{suffix}", publication=f"roles_{suffix}")
    with psycopg.connect(roles.db_url, autocommit=True) as admin:
        setup(admin, config)
        admin.execute(sql.SQL("REVOKE {} ON {} FROM {}").format(
            sql.SQL(privilege), sql.Identifier(table), sql.Identifier(roles.name("relay_wal"))))
    settings = RelaySettings(
        source="postgres-wal", db_url=roles.url("relay_wal"), kafka_bootstrap=kafka_bootstrap,
        slot=config.slot, publication=config.publication, keep_published=keep)
    with pytest.raises(FatalRelayError, match=message):
        relay_main.run(settings, threading.Event())


def test_consumer_role_claims_and_purges_but_cannot_touch_the_outbox(roles: Roles) -> None:
    with roles.connect("consumer") as conn:
        claimed = conn.execute(
            "INSERT INTO outbox_inbox (consumer, event_id) VALUES ('billing', gen_random_uuid())"
            " ON CONFLICT DO NOTHING RETURNING event_id").fetchall()
        assert len(claimed) == 1
        conn.execute("DELETE FROM outbox_inbox WHERE consumer = 'billing'")
        # ordering="sequence": the last applied number per aggregate, read and upserted.
        conn.execute(
            "INSERT INTO outbox_inbox_sequence AS s VALUES ('billing', 'Order', '1', 1)"
            " ON CONFLICT (consumer, aggregate_type, aggregate_id)"
            " DO UPDATE SET last_sequence = excluded.last_sequence")
        conn.execute("SELECT last_sequence FROM outbox_inbox_sequence FOR UPDATE")
        conn.commit()
        assert denied(conn, "SELECT * FROM outbox")
        assert denied(conn, "SELECT * FROM outbox_sequence")
        assert denied(conn, "DELETE FROM outbox_parked")


def test_any_role_may_emit_logical_messages_unless_restricted(
    db_url: str, pg_admin_url: str
) -> None:
    emit = "SELECT pg_logical_emit_message(true, 'outbox', 'forged')"
    with roles_for(db_url, pg_admin_url) as roles, roles.connect("consumer") as conn:
        assert not denied(conn, emit), "PostgreSQL's default: PUBLIC may emit messages"
    with roles_for(db_url, pg_admin_url, restrict_messages="on") as roles:
        for kind in ("consumer", "relay_poll", "relay_wal"):
            with roles.connect(kind) as conn:
                assert denied(conn, emit), kind
        with roles.connect("app") as conn:
            outbox.Outbox(mode="message").publish(conn, outbox.Event("Order", "1", "E", {}))
            conn.commit()


def test_doctor_finds_nothing_missing_for_the_relay_roles(roles: Roles) -> None:
    poll = doctor.run(roles.url("relay_poll"), doctor.DoctorOptions())
    assert {r.name: r.level for r in poll}["privileges"] is doctor.Level.OK
    assert {r.name: r.level for r in poll}["least privilege"] is doctor.Level.OK
    assert {r.name: r.level for r in poll}["outbox schema"] is doctor.Level.OK
    app = doctor.run(roles.url("app"), doctor.DoctorOptions())
    privileges = next(r for r in app if r.name == "privileges")
    assert privileges.level is doctor.Level.FAIL
    assert "lacks SELECT, DELETE on public.outbox" in privileges.message
    wal = doctor.run(roles.url("relay_wal"), doctor.DoctorOptions(source="postgres-wal"))
    levels = {r.name: r.level for r in wal}
    assert levels["replication role"] is doctor.Level.OK
    assert levels["privileges"] is doctor.Level.OK
    assert levels["replication connection"] is doctor.Level.OK
    assert levels["least privilege"] is doctor.Level.OK

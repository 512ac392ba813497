"""`outbox verify` against the real services: a verdict, exit codes, and nothing left behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from psycopg import sql
from pymongo import MongoClient

from relay.verify.plan import PREFIX
from relay.verify.scratch import leftovers
from tests.integration.test_ops_roles import Roles, roles_for
from tests.support.relays import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]


def verify_args(db_url: str, kafka: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", "verify", "--db", db_url, "--kafka", kafka,
            *options]


def clean_env() -> dict[str, str]:
    """The test process's environment without OUTBOX_* settings (verify reads its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}


def run_verify(db_url: str, kafka: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(verify_args(db_url, kafka, *options), env=clean_env(),
                          capture_output=True, text=True, timeout=240)


def topics_of(kafka: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": kafka})
    return set(admin.list_topics(timeout=10).topics)


def scratch_suffix(output: str) -> str:
    match = re.search(r"topic outbox-verify-(\w+)", output)
    assert match, f"no scratch topic named in:\n{output}"
    return match[1]


def assert_nothing_left(db_url: str, kafka: str, suffix: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert leftovers(conn) == []
        tracking = conn.execute("SELECT to_regclass('public.outbox_migrations')").fetchone()
        if tracking and tracking[0]:
            rows = conn.execute("SELECT count(*) FROM outbox_migrations WHERE target LIKE %s",
                                [PREFIX + "%"]).fetchone()
            assert rows == (0,)
    assert f"outbox-verify-{suffix}" not in topics_of(kafka)


def app_outbox_rows(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("source", ["postgres-poll", "postgres-wal"])
def test_verify_passes_under_relay_kill_and_stop_and_removes_its_objects(
    db_url: str, kafka_bootstrap: str, source: str
) -> None:
    result = run_verify(db_url, kafka_bootstrap, "--source", source, "--duration", "12s",
                        "--rate", "200", "--faults", "relay-kill,relay-stop")
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    for figure in ("committed", "delivered", "lost        0", "phantom     0", "duplicates",
                   "order       kept", "slowest recovery", "verdict: PASS"):
        assert figure in out, out
    assert "fault       relay-kill" in out and "fault       relay-stop" in out
    assert "not recovered" not in out
    assert "in Kafka" in result.stderr  # the live progress line
    committed = int(re.search(r"committed\s+([\d,]+) events", out)[1].replace(",", ""))  # type: ignore[index]
    assert committed > 1000
    assert_nothing_left(db_url, kafka_bootstrap, scratch_suffix(out))
    assert app_outbox_rows(db_url) == 0  # the application's outbox was never written


@pytest.mark.parametrize("source", ["mongo-poll", "mongo-stream"])
def test_verify_passes_for_the_mongodb_sources_and_drops_its_database(
    mongo_url: str, kafka_bootstrap: str, source: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "verify", "--source", source, "--mongo", mongo_url,
         "--kafka", kafka_bootstrap, "--duration", "10s", "--rate", "100",
         "--faults", "relay-kill,relay-stop"],
        env=clean_env(), capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    assert "lost        0" in out and "phantom     0" in out and "order       kept" in out
    assert "fault       relay-kill" in out and "fault       relay-stop" in out
    suffix = scratch_suffix(out)
    with MongoClient(mongo_url) as client:
        assert f"{PREFIX}{suffix}" not in client.list_database_names()
    assert f"outbox-verify-{suffix}" not in topics_of(kafka_bootstrap)


def test_connection_drop_ends_the_relays_sessions(db_url: str, kafka_bootstrap: str) -> None:
    result = run_verify(db_url, kafka_bootstrap, "--duration", "8s", "--rate", "100",
                        "--faults", "connection-drop")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    found = re.search(r"connection-drop at .*\((\d+) of (\d+) session\(s\) ended\)", result.stdout)
    assert found, result.stdout
    assert int(found[1]) == int(found[2]) >= 1
    assert_nothing_left(db_url, kafka_bootstrap, scratch_suffix(result.stdout))


@pytest.mark.parametrize(("stop_signal", "source"), [
    (signal.SIGINT, "postgres-wal"), (signal.SIGTERM, "postgres-poll")])
def test_a_stop_signal_ends_the_run_and_removes_everything(
    empty_db_url: str, kafka_bootstrap: str, stop_signal: signal.Signals, source: str
) -> None:
    """In a database without an outbox: the migration bookkeeping it made goes too."""
    process = subprocess.Popen(
        verify_args(empty_db_url, kafka_bootstrap, "--source", source, "--duration",
                    "60s", "--rate", "100", "--faults", "relay-kill"),
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen = []
    try:
        for line in process.stderr:  # blocks until verify writes; ends if verify exits
            seen.append(line)
            if line.startswith("writing "):
                break
        assert seen and seen[-1].startswith("writing "), "".join(seen)
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            assert leftovers(conn), "the scratch objects exist while it runs"
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out + err
    assert "interrupted: no verdict" in out
    assert "removed everything it created" in out
    assert_nothing_left(empty_db_url, kafka_bootstrap, scratch_suffix(out))
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.outbox_migrations')").fetchone() == (None,)


def test_committed_events_that_vanish_fail_the_run_as_lost(
    db_url: str, kafka_bootstrap: str
) -> None:
    """Verify's verdict can fail: rows deleted behind the relay's back while it is stopped."""
    process = subprocess.Popen(
        verify_args(db_url, kafka_bootstrap, "--duration", "10s", "--rate", "200",
                    "--faults", "relay-stop"),
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    table = None
    try:
        for line in process.stderr:
            found = re.match(r"created table public\.(outbox_verify_\w+) ", line)
            table = found[1] if found else table
            if "relay-stop: stopped" in line:
                break
        assert table is not None
        scratch = sql.Identifier(table)
        with psycopg.connect(db_url, autocommit=True) as conn:
            # Rows committed while the relay is stopped: it has not read them.
            wait_for(lambda: (conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                scratch)).fetchone() or (0,))[0] >= 40, 5, "rows behind the stopped relay")
            deleted = conn.execute(sql.SQL("DELETE FROM {}").format(scratch)).rowcount
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert deleted >= 40
    assert process.returncode == 1, out + err
    lost = int(re.search(r"lost\s+([\d,]+)", out)[1].replace(",", ""))  # type: ignore[index]
    assert 0 < lost <= deleted
    assert "verdict: FAIL" in out and "committed event(s) never delivered" in out
    kept = re.search(r"relay log kept at (\S+)", out)
    assert kept, out
    log = Path(kept[1])
    assert "relay_starting" in log.read_text()
    shutil.rmtree(log.parent)
    assert_nothing_left(db_url, kafka_bootstrap, scratch_suffix(out))


@pytest.fixture
def relay_roles(db_url: str, pg_admin_url: str) -> Iterator[Roles]:
    with roles_for(db_url, pg_admin_url) as created:
        yield created


def test_a_role_without_the_rights_is_refused_before_anything_is_created(
    relay_roles: Roles, kafka_bootstrap: str
) -> None:
    """The WAL relay's own role (deploy/roles.sql) may not create a table or a publication."""
    before = {t for t in topics_of(kafka_bootstrap) if t.startswith("outbox-verify-")}
    result = run_verify(relay_roles.url("relay_wal"), kafka_bootstrap,
                        "--source", "postgres-wal", "--duration", "5s")
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    role = relay_roles.name("relay_wal")
    assert "nothing was created" in err
    assert f"role {role} may not create its scratch outbox table in schema public" in err
    assert f'GRANT USAGE, CREATE ON SCHEMA "public" TO "{role}"' in err
    assert "may not record and remove the scratch table's migrations" in err
    assert "may not run the migrations (and create the scratch publication)" in err
    assert "lacks REPLICATION" not in err  # it has it
    with psycopg.connect(relay_roles.db_url, autocommit=True) as conn:
        assert leftovers(conn) == []
    after = {t for t in topics_of(kafka_bootstrap) if t.startswith("outbox-verify-")}
    assert after <= before


def test_the_polling_relays_role_with_a_create_grant_verifies(
    relay_roles: Roles, kafka_bootstrap: str
) -> None:
    """The documented rights plus those of the scratch table: enough, no superuser needed."""
    role = sql.Identifier(relay_roles.name("relay_poll"))
    with psycopg.connect(relay_roles.db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), role))
        conn.execute(sql.SQL("GRANT INSERT, DELETE ON outbox_migrations TO {}").format(role))
    result = run_verify(relay_roles.url("relay_poll"), kafka_bootstrap, "--duration", "6s",
                        "--rate", "100", "--faults", "relay-kill")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_nothing_left(relay_roles.db_url, kafka_bootstrap, scratch_suffix(result.stdout))



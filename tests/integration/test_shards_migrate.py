"""`outbox migrate up --shards N`: a sharded outbox, its count recorded, never changed silently."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest

import outbox
from outbox import migrate
from outbox.errors import ConfigurationError, MigrationError
from outbox.names import SchemaNames
from tests.integration.test_migrate import run_cli

pytestmark = pytest.mark.integration


def shards_of(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT aggregate_id, shard FROM outbox").fetchall()
    return dict(rows)


def test_sharded_outbox_spreads_keys_over_its_shards_with_publish_unchanged(
    empty_db_url: str,
) -> None:
    names = SchemaNames()
    with psycopg.connect(empty_db_url) as conn:
        applied = migrate.up(conn, names, shards=12)
        assert [m.name for m in applied][-1] == "shards"
        assert migrate.shard_count(conn, names) == 12
        # Twice the same key, many keys: the application's publish call is the usual one.
        events = [outbox.Event("Order", f"k{i}", "Created", {"i": i}) for i in range(600)]
        outbox.publish(conn, *events, *events[:10])
        conn.commit()
        rows = conn.execute("SELECT aggregate_id, shard FROM outbox").fetchall()
    per_key: dict[str, set[int]] = {}
    for key, shard in rows:
        per_key.setdefault(key, set()).add(shard)
    assert all(len(shards) == 1 for shards in per_key.values()), "a key in two shards"
    spread = Counter(next(iter(s)) for s in per_key.values())
    assert set(spread) == set(range(12)), spread
    assert min(spread.values()) > 600 / 12 / 3, f"shards far from even: {spread}"


def test_shard_of_a_key_is_stable_across_databases(empty_db_url: str, db_url: str) -> None:
    """The hash is the server's, not a session's: the same key lands in the same shard."""
    names = SchemaNames()
    with psycopg.connect(empty_db_url) as first, psycopg.connect(db_url) as second:
        migrate.up(first, names, shards=7)
        migrate.up(second, names, shards=7)  # an outbox with rows made sharded later
        for conn in (first, second):
            outbox.publish(conn, *(outbox.Event("A", f"key-{i}", "E", {}) for i in range(50)))
            conn.commit()
        assert shards_of(first) == shards_of(second)


def test_changing_the_shard_count_is_refused_and_points_to_the_procedure(
    empty_db_url: str,
) -> None:
    names = SchemaNames()
    with psycopg.connect(empty_db_url) as conn:
        migrate.up(conn, names, shards=4)
        assert migrate.up(conn, names, shards=4) == []
        assert migrate.up(conn, names) == []  # without --shards: nothing to do either
        with pytest.raises(MigrationError, match=r"has 4 shards, not 8.*Sharded outbox"):
            migrate.up(conn, names, shards=8)
        assert migrate.shard_count(conn, names) == 4
        assert [s.migration.name for s in migrate.status(conn, names)][-1] == "shards"


def test_shard_count_out_of_range_or_another_layout_is_refused_before_anything(
    empty_db_url: str,
) -> None:
    names = SchemaNames()
    with psycopg.connect(empty_db_url) as conn:
        with pytest.raises(ConfigurationError, match="from 1 to 1024"):
            migrate.up(conn, names, shards=0)
        with pytest.raises(ConfigurationError, match="native layout"):
            migrate.up(conn, names, "debezium", shards=4)
        assert migrate.shard_count(conn, names) is None
        assert conn.execute("SELECT to_regclass('outbox')").fetchone() == (None,)


def test_cli_migrate_up_with_shards(empty_db_url: str) -> None:
    up = run_cli("migrate", "up", "--db", empty_db_url, "--shards", "3")
    assert up.returncode == 0, up.stderr
    assert "applied 0006_shards" in up.stdout
    again = run_cli("migrate", "up", "--db", empty_db_url, "--shards", "5")
    assert again.returncode == 1 and "has 3 shards, not 5" in again.stderr
    debezium = run_cli("migrate", "up", "--db", empty_db_url, "--shards", "3",
                       "--columns", "debezium", "--table", "dbz")
    assert debezium.returncode == 1 and "native layout" in debezium.stderr
    sql_text = run_cli("migrate", "sql", "--shards", "3").stdout
    assert "generate_series(0, 3 - 1)" in sql_text

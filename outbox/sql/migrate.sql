-- The bookkeeping of `outbox migrate` (outbox/migrate.py): which migration files were applied to
-- which outbox table. The migrations themselves are whole files in outbox/migrations/.

-- name: tracking_table
-- The only object created with IF NOT EXISTS, and only under the advisory lock: it has to exist
-- before the applied versions can be read.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.{migrations_table} ( target text NOT NULL, version int NOT NULL, name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, version))

-- name: record_migration
-- Values as bound parameters (migrate up) or as literals (migrate sql, for other tools).
INSERT INTO {schema}.{migrations_table} (target, version, name, checksum) VALUES ({target}, {version}, {name}, {checksum})

-- name: applied
SELECT version, checksum, applied_at::text, name FROM {schema}.{migrations_table}
WHERE target = %(target)s

-- name: tracking_exists
SELECT to_regclass(%(table)s) IS NOT NULL

-- name: lock
-- One lock for every `migrate up` on the cluster: two concurrent runs apply each file once.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: shard_count
-- N of a sharded outbox (`migrate up --shards N`): its shards table has a row per shard.
SELECT count(*) FROM {schema}.{shards_table}

-- name: lock_for_resize
-- `outbox shards resize`: nobody reads or writes the outbox while its rows change shards.
LOCK TABLE {schema}.{table}, {schema}.{shards_table} IN ACCESS EXCLUSIVE MODE

-- name: unshard
-- Undoes the sharding migration (its index goes with the column), which is then applied again
-- with the new count: the column's definition stays in one place, the migration file.
ALTER TABLE {schema}.{table} DROP COLUMN shard;
DROP TABLE {schema}.{shards_table}

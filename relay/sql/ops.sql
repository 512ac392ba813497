-- Read-only queries behind `outbox status` and `outbox doctor` (relay/status.py, relay/doctor.py).
-- None of them takes a lock stronger than ACCESS SHARE: both commands are safe to run against a
-- production database, from a cron job or a monitoring probe.

-- name: tables
-- Which of the outbox tables exist and what the connecting role may do with them (a table
-- privilege is of no use without USAGE on the schema); status and doctor read only what the role
-- can see instead of failing on the first permission error.
SELECT t.name,
       c.oid IS NOT NULL,
       c.oid IS NOT NULL AND s.usable AND pg_catalog.has_table_privilege(c.oid, 'SELECT'),
       c.oid IS NOT NULL AND s.usable AND pg_catalog.has_table_privilege(c.oid, 'INSERT'),
       c.oid IS NOT NULL AND s.usable AND pg_catalog.has_table_privilege(c.oid, 'UPDATE'),
       c.oid IS NOT NULL AND s.usable AND pg_catalog.has_table_privilege(c.oid, 'DELETE'),
       c.oid IS NOT NULL AND pg_catalog.pg_has_role(c.relowner, 'USAGE')
FROM unnest(%(tables)s::text[]) AS t(name)
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = %(schema)s
LEFT JOIN pg_catalog.pg_class c
       ON c.relname = t.name AND c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
CROSS JOIN LATERAL (
    SELECT n.oid IS NOT NULL AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')
) AS s(usable)
ORDER BY t.name

-- name: backlog
-- Unpublished rows and the age of the oldest; one scan of the partial pending index.
SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8
FROM {schema}.{table}
WHERE published_at IS NULL

-- name: last_published
-- When the relay last marked a row published (kept rows only: deleted rows leave no trace).
-- Bounded on purpose: max(published_at) over a table that keeps days of rows would scan all of
-- it on every call. Rows are published roughly in position order, so the newest published
-- positions carry the newest times (a late commit published a moment later may be missed).
SELECT max(published_at)
FROM (
    SELECT published_at FROM {schema}.{table}
    WHERE published_at IS NOT NULL
    ORDER BY position DESC
    LIMIT 1000
) AS recent

-- name: parked
SELECT count(*), min(parked_at) FROM {schema}.{parked_table}

-- name: leader
-- The session holding the polling relay's advisory lock. pg_try_advisory_lock(bigint) shows up
-- in pg_locks with the key's high half in classid, its low half in objid and objsubid 1.
SELECT l.pid, a.backend_start, a.client_addr::text, a.application_name
FROM pg_catalog.pg_locks l
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND l.classid = %(classid)s::bigint::oid
  AND l.objid = %(objid)s::bigint::oid
  AND l.objsubid = 1
  AND l.granted

-- name: wal_position
SELECT pg_catalog.pg_current_wal_lsn()::text

-- name: settings
-- The server settings the WAL relay depends on (readable by any role).
SELECT name, setting, unit
FROM pg_catalog.pg_settings
WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders',
               'max_slot_wal_keep_size', 'wal_sender_timeout', 'server_version_num')

-- name: replication_usage
-- Slots and WAL senders in use across the cluster (both limits are cluster-wide).
SELECT (SELECT count(*) FROM pg_catalog.pg_replication_slots),
       (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender')

-- name: role
-- The connecting role's attributes, and whether the outbox schema exists and it may use it.
SELECT current_user::text, r.rolsuper, r.rolreplication, r.rolcanlogin,
       n.oid IS NOT NULL,
       n.oid IS NOT NULL AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')
FROM pg_catalog.pg_roles r
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = %(schema)s
WHERE r.rolname = current_user

-- name: current_role
SELECT current_user::text

-- name: identify_system
-- A replication connection's first command: `outbox doctor` opens one as the relay does.
IDENTIFY_SYSTEM

-- name: shard_backlog
-- A sharded outbox: each shard's unpublished rows and the age of its oldest.
SELECT s.shard, count(o.position), EXTRACT(EPOCH FROM now() - min(o.created_at))::float8
FROM {schema}.{shards_table} s
LEFT JOIN {schema}.{table} o ON o.shard = s.shard AND o.published_at IS NULL
GROUP BY s.shard
ORDER BY s.shard

-- `outbox verify` (relay/verify/): what the role may do before anything is created, the relay's
-- connections to drop (connection-drop), and removing the scratch outbox afterwards.

-- name: role
-- The connecting role's attributes and the rights verify needs besides the relay's: create its
-- scratch tables in the schema (their owner has every right on them), and read, record and
-- remove its rows of the migration bookkeeping when that table exists already.
SELECT current_user::text,
       pg_catalog.current_database()::text,
       r.rolsuper,
       r.rolreplication,
       n.oid IS NOT NULL,
       n.oid IS NOT NULL AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'),
       n.oid IS NOT NULL AND pg_catalog.has_schema_privilege(n.oid, 'CREATE'),
       pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'),
       m.oid IS NOT NULL,
       COALESCE(pg_catalog.has_table_privilege(m.oid, 'SELECT'), false),
       COALESCE(pg_catalog.has_table_privilege(m.oid, 'INSERT'), false),
       COALESCE(pg_catalog.has_table_privilege(m.oid, 'DELETE'), false)
FROM pg_catalog.pg_roles r
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = %(schema)s
LEFT JOIN pg_catalog.pg_class m
       ON m.relnamespace = n.oid AND m.relname = %(migrations_table)s AND m.relkind = 'r'
WHERE r.rolname = current_user

-- name: terminate_relay
-- connection-drop: end every session of the verify run's relay (found by its application_name,
-- which no other client uses). pg_terminate_backend needs the same role (or pg_signal_backend).
SELECT count(*) FILTER (WHERE terminated), count(*)
FROM (
    SELECT pg_catalog.pg_terminate_backend(a.pid) AS terminated
    FROM pg_catalog.pg_stat_activity a
    WHERE a.application_name = %(application_name)s
      AND a.datname = pg_catalog.current_database()
      AND a.pid <> pg_catalog.pg_backend_pid()
) AS t

-- name: end_slot_sender
-- Before the scratch slot is dropped: a killed relay's WAL sender may hold it for a moment.
SELECT pg_catalog.pg_terminate_backend(active_pid)
FROM pg_catalog.pg_replication_slots
WHERE slot_name = %(slot)s AND active_pid IS NOT NULL

-- name: drop_tables
-- Every table the migrations create for an outbox and its inbox (outbox/names.py).
DROP TABLE IF EXISTS {schema}.{table}, {schema}.{parked_table}, {schema}.{position_table},
    {schema}.{sequence_table}, {schema}.{shards_table}, {schema}.{inbox_table},
    {schema}.{inbox_sequence_table}

-- name: drop_notify_function
DROP FUNCTION IF EXISTS {schema}.{notify_function}()

-- name: forget_migrations
DELETE FROM {schema}.{migrations_table} WHERE target = %(target)s

-- name: migrations_left
SELECT count(*) FROM {schema}.{migrations_table}

-- name: drop_migrations_table
-- Only when verify created it and no other outbox has been migrated since.
DROP TABLE {schema}.{migrations_table}

-- name: scratch_tables
-- What is left of a run's scratch objects (its tests check that nothing is).
SELECT c.relname::text FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname LIKE %(pattern)s AND c.relkind IN ('r', 'p')
UNION ALL
SELECT slot_name::text FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE %(pattern)s
UNION ALL
SELECT pubname::text FROM pg_catalog.pg_publication WHERE pubname LIKE %(pattern)s

-- The WAL relay's slot and publication (relay/wal/slots.py). These run on ordinary connections
-- and on replication ones, which accept only the simple query protocol: values come in as
-- quoted literals ({slot}, {publication_name}, ...: sql.Literal), names as sql.Identifier.

-- name: slot_status
SELECT slot_name::text, plugin::text, slot_type, database::text, temporary, active,
       active_pid, wal_status, restart_lsn::text, confirmed_flush_lsn::text,
       CASE WHEN restart_lsn IS NOT NULL
            THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint
       END,
       safe_wal_size, two_phase
FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot}

-- name: current_database
SELECT pg_catalog.current_database()::text

-- name: create_slot
SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot({slot}, {plugin})

-- name: drop_slot
SELECT pg_catalog.pg_drop_replication_slot({slot})

-- name: publication
SELECT puballtables, pubinsert FROM pg_catalog.pg_publication WHERE pubname = {publication_name}

-- name: publications_named
-- The publications whose name starts with {prefix}: the shard groups' (relay/wal/groups.py).
SELECT pubname::text FROM pg_catalog.pg_publication WHERE starts_with(pubname, {prefix})

-- name: publication_tables
-- Column lists and row filters exist from PostgreSQL 15 on ({details} is NULL, NULL before).
SELECT schemaname::text, tablename::text, {details}
FROM pg_catalog.pg_publication_tables
WHERE pubname = {publication_name}
ORDER BY 1, 2

-- name: table_columns
SELECT a.attname::text FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = {schema_name} AND c.relname = {table_name} AND a.attnum > 0
  AND NOT a.attisdropped
ORDER BY a.attnum

-- name: create_publication
CREATE PUBLICATION {publication} {target} WITH (publish = 'insert')

-- name: drop_publication
DROP PUBLICATION {publication}

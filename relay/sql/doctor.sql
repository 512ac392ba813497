-- The statements `outbox doctor` proposes as fixes (relay/doctor.py): shown to the user, never
-- run by the relay. Names come in as sql.Identifier, values as sql.Literal, privileges from
-- doctor's own lists; each block is one line of a fix.

-- name: set_wal_level
ALTER SYSTEM SET wal_level = logical

-- name: list_slots
SELECT slot_name, active FROM pg_replication_slots

-- name: set_wal_keep_size
ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'

-- name: grant_usage
GRANT USAGE ON SCHEMA {schema} TO {role}

-- name: grant
GRANT {privileges} ON {schema}.{relation} TO {role}

-- name: grant_replication
ALTER ROLE {role} WITH LOGIN REPLICATION

-- name: create_publication
CREATE PUBLICATION {publication} FOR TABLE {schema}.{table} WITH (publish = 'insert')

-- name: add_to_publication
ALTER PUBLICATION {publication} ADD TABLE {schema}.{table}

-- name: publish_inserts
ALTER PUBLICATION {publication} SET (publish = 'insert')

-- name: drop_publication
DROP PUBLICATION {publication}

-- name: create_slot
SELECT pg_create_logical_replication_slot({slot}, 'pgoutput')

-- What the relays ask the catalog at start-up (relay/catalog.py); tables are named as
-- schema-qualified, quoted text ("public"."outbox").

-- name: table_exists
SELECT to_regclass(%(table)s) IS NOT NULL

-- name: may
SELECT has_table_privilege(%(table)s, %(privilege)s)

-- name: may_on_column
SELECT has_column_privilege(%(table)s, %(column)s, %(privilege)s)

-- name: column_types
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = %(table)s::regclass AND attnum > 0 AND NOT attisdropped

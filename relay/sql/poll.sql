-- Queries of the polling relay (relay/poll/relay.py).

-- name: begin_snapshot
-- One snapshot for the three reads below (they run in one pipeline: one round trip).
BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY

-- name: snapshot
-- Which transactions had not completed in this snapshot (see relay/poll/cursor.py).
SELECT pg_snapshot_xmax(s)::text, array(SELECT pg_snapshot_xip(s)::text)
FROM pg_current_snapshot() AS s

-- name: fetch_late
-- Rows below the cursor of transactions that had not completed at the last read (those that
-- committed since); the partial txid index makes this cheap.
SELECT position, id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
       headers::text, created_at
FROM {schema}.{table}
WHERE published_at IS NULL
  AND position <= %(ceiling)s
  AND (txid = ANY(%(in_progress)s::text[]::xid8[]) OR txid >= %(xmax)s::text::xid8)
ORDER BY position

-- name: fetch_page
-- The next page above the cursor, in insertion order; rows of running transactions are not
-- visible and are picked up by fetch_late once they commit.
SELECT position, id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
       headers::text, created_at
FROM {schema}.{table}
WHERE published_at IS NULL AND position > %(after)s
ORDER BY position
LIMIT %(limit)s

-- name: end_snapshot
COMMIT

-- name: delete_published
DELETE FROM {schema}.{table} WHERE position = ANY(%(positions)s)

-- name: mark_published
-- With keep_published; {set_topic} stores the topic the event was sent to, for `outbox replay`
-- (relay/published.py kept_topic).
UPDATE {schema}.{table} SET published_at = now(){set_topic} WHERE position = ANY(%(positions)s)

-- name: park
-- Moves an event that can never be published to the parked table, with the reason.
WITH moved AS (
    DELETE FROM {schema}.{table} WHERE position = %(position)s
    RETURNING id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
              headers, created_at
)
INSERT INTO {schema}.{parked_table}
    (id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
     created_at, reason)
SELECT id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
       created_at, %(reason)s
FROM moved
ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, parked_at = now()

-- name: listen
LISTEN {channel_identifier}

-- name: try_leadership
SELECT pg_try_advisory_lock(%(key)s)

-- name: fetch_late_mapped
-- Twins of the blocks above that name event columns, for a table of another layout (Debezium's,
-- given the polling relay's bookkeeping by `outbox migrate up --columns debezium`): the
-- bookkeeping columns (position, txid, published_at) are the same, the event columns are
-- composed from the column mapping in relay/poll/relay.py: event_columns is
-- fetch_late's select list after position: mapped columns, defaults for absent ones, the
-- payload as bytes.
SELECT position, {event_columns}
FROM {schema}.{table}
WHERE published_at IS NULL
  AND position <= %(ceiling)s
  AND (txid = ANY(%(in_progress)s::text[]::xid8[]) OR txid >= %(xmax)s::text::xid8)
ORDER BY position

-- name: fetch_page_mapped
SELECT position, {event_columns}
FROM {schema}.{table}
WHERE published_at IS NULL AND position > %(after)s
ORDER BY position
LIMIT %(limit)s

-- name: park_mapped
-- A row whose payload is null cannot be an event: it is parked with the whole row in raw.
WITH moved AS (
    DELETE FROM {schema}.{table} WHERE position = %(position)s RETURNING *
)
INSERT INTO {schema}.{parked_table}
    (id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
     created_at, raw, reason)
SELECT {parked_columns}, CASE WHEN moved.{payload} IS NULL THEN to_jsonb(moved) END,
       %(reason)s
FROM moved
ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, parked_at = now()

-- name: backlog_mapped
SELECT count(*), {oldest} FROM {schema}.{table} WHERE published_at IS NULL

-- Sharded outbox (`outbox relay --shards`, relay/poll/shards.py): the same reads, of the rows
-- of the shards this relay holds; the (position, shard) index checks the shard inside the index.

-- name: fetch_late_sharded
SELECT position, id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
       headers::text, created_at
FROM {schema}.{table}
WHERE published_at IS NULL
  AND position <= %(ceiling)s
  AND (txid = ANY(%(in_progress)s::text[]::xid8[]) OR txid >= %(xmax)s::text::xid8)
  AND shard = ANY(%(shards)s::int[])
ORDER BY position

-- name: fetch_page_sharded
SELECT position, id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
       headers::text, created_at
FROM {schema}.{table}
WHERE published_at IS NULL AND position > %(after)s AND shard = ANY(%(shards)s::int[])
ORDER BY position
LIMIT %(limit)s

-- name: try_shard
-- A shard's lease: a session advisory lock (table key, shard), taken on the connection that reads
-- and deletes the shard's rows, so it ends with the session that publishes them.
SELECT pg_try_advisory_lock(%(key)s::int, %(shard)s::int)

-- name: join_relays
-- A live relay holds (table key, -its backend pid) on its membership connection for as long as
-- it runs: the relays sharing the outbox count these.
SELECT pg_try_advisory_lock(%(key)s::int, -pg_backend_pid())

-- name: lease
-- The server ends a session idle for longer than the lease (a hung or cut-off relay), and its
-- locks with it; a relay touches its sessions more often than that.
SELECT set_config('idle_session_timeout', %(lease)s, false)

-- name: touch
SELECT 1

-- name: shard_locks
-- The advisory locks of the table key: (table key, shard) held by the shard's owner, (table key,
-- -pid) by each live relay. Two-int locks show in pg_locks with classid = the first key, objid =
-- the second (as unsigned 32-bit oids) and objsubid 2. Readable by every role.
SELECT l.objid::bigint, l.pid, a.client_addr::text, a.application_name
FROM pg_catalog.pg_locks l
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND l.classid = %(classid)s::bigint::oid
  AND l.objsubid = 2
  AND l.granted

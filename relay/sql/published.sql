-- What both PostgreSQL relays do with the outbox rows they published (relay/published.py,
-- relay/wal/cleanup.py): the backlog, and the purge of rows kept with keep_published.

-- name: backlog
SELECT count(*), min(created_at) FROM {schema}.{table} WHERE published_at IS NULL

-- name: delete_expired
-- Published rows kept for `keep_published`; deleted in bounded chunks to keep locks short.
DELETE FROM {schema}.{table}
WHERE position IN (
    SELECT position FROM {schema}.{table}
    WHERE published_at < now() - %(keep)s::interval
    LIMIT 10000
)

-- name: current_xmax
-- The 64-bit transaction counter, to widen pgoutput's 32-bit xids (relay/published.py).
SELECT pg_snapshot_xmax(pg_current_snapshot())::text

-- name: delete_transactions
-- The WAL relay: rows of transactions whose events Kafka acknowledged, at most 10,000 rows per
-- statement (run again until fewer come back). Writers only insert, so deleting committed rows
-- waits for no one.
DELETE FROM {schema}.{table}
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.{table}
    WHERE published_at IS NULL AND txid = ANY(%(txids)s::text[]::xid8[])
    LIMIT 10000
))

-- name: mark_transactions
-- As delete_transactions, with keep_published: marked now, deleted by delete_expired later;
-- each row gets its transaction's commit LSN, the commit order `outbox replay` follows
-- (migrations/0005), looked up in `lsn_of` (a JSON object: txid -> LSN). A lookup, not a join
-- with the transactions: a join updated the rows out of their physical order, at three times
-- the cost of the mark without it; this costs what that did (docs/performance.md, retention).
-- {set_topic} stores the topic the event was sent to (relay/published.py kept_topic).
UPDATE {schema}.{table}
SET published_at = now(), commit_lsn = (%(lsn_of)s::jsonb ->> txid::text)::pg_lsn{set_topic}
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {schema}.{table}
    WHERE published_at IS NULL AND txid = ANY(%(txids)s::text[]::xid8[])
    LIMIT 10000
))

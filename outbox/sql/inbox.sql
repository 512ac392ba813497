-- The idempotent consumer's dedup table (outbox/consumer/queries.py fills in the parameters in
-- the driver's style: psycopg's %(name)s or SQLAlchemy's :name).

-- name: claim
-- Ordered inserts take the rows' locks in one order, so two consumers that claim overlapping
-- batches during a rebalance wait for each other instead of deadlocking. A concurrent claim of
-- the same id waits for the other transaction and then, if it committed, inserts nothing.
INSERT INTO {schema}.{inbox_table} (consumer, event_id)
SELECT {consumer}, id FROM unnest({ids}) AS claimed(id) ORDER BY id
ON CONFLICT DO NOTHING RETURNING event_id

-- name: purge
-- Deletes in chunks so that a large purge never holds one long transaction.
DELETE FROM {schema}.{inbox_table} AS i USING (
    SELECT consumer, event_id FROM {schema}.{inbox_table}
    WHERE processed_at < now() - {older_than} AND ({consumer} IS NULL OR consumer = {consumer})
    LIMIT {limit}
) AS old
WHERE i.consumer = old.consumer AND i.event_id = old.event_id

-- name: check
SELECT consumer, event_id, processed_at FROM {schema}.{inbox_table} LIMIT 0

-- name: read_sequences
-- ordering="sequence": the last applied number of each aggregate of a batch, locked until the
-- transaction ends (in one order, like the claim), so that two consumers of one aggregate during
-- a rebalance judge its numbers one after the other.
SELECT s.aggregate_type, s.aggregate_id, s.last_sequence
FROM {schema}.{inbox_sequence_table} AS s
JOIN unnest({types}, {ids}) AS k(t, i) ON s.aggregate_type = k.t AND s.aggregate_id = k.i
WHERE s.consumer = {consumer}
ORDER BY s.aggregate_type, s.aggregate_id
FOR UPDATE OF s

-- name: save_sequences
-- GREATEST: a number never goes back, even if another consumer inserted the aggregate's first
-- row after this transaction read none.
INSERT INTO {schema}.{inbox_sequence_table} AS s
    (consumer, aggregate_type, aggregate_id, last_sequence)
SELECT {consumer}, t, i, n FROM unnest({types}, {ids}, {numbers}) AS k(t, i, n) ORDER BY t, i
ON CONFLICT (consumer, aggregate_type, aggregate_id)
DO UPDATE SET last_sequence = GREATEST(s.last_sequence, excluded.last_sequence)

-- name: check_sequences
SELECT consumer, aggregate_type, aggregate_id, last_sequence
FROM {schema}.{inbox_sequence_table} LIMIT 0

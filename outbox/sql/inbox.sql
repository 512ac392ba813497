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

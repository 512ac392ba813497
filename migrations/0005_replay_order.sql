-- What `outbox replay` needs of a published row kept with keep_published, besides its
-- position, txid and published_at: the commit order of the WAL relay. The WAL relay publishes
-- in commit order, which for two transactions writing one aggregate concurrently may differ
-- from position order; it sets the commit LSN of the row's transaction when it marks the row.
-- The polling relay publishes in position order and leaves it NULL. Nullable without a default:
-- adding it rewrites nothing, and inserts by outbox.publish do not write it. It applies as it
-- is to a Debezium table too (which has the bookkeeping columns since debezium_0001): no twin.
ALTER TABLE {schema}.{table} ADD COLUMN commit_lsn pg_lsn;

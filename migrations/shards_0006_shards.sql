-- A sharded outbox (`outbox migrate up --shards N`; not applied otherwise): every row belongs to
-- one of N shards by a stable hash of its aggregate_id, so each key lives in exactly one shard
-- and several polling relays can each publish a disjoint set of shards, in per-key order
-- (relay/poll/shards.py). {shards} is N, fixed here: changing it is a resize
-- (docs/operations.md, "Sharded outbox").

-- N recorded in the database, one row per shard: the relay reads N from it, `outbox status`
-- lists the shards from it.
CREATE TABLE {schema}.{shards_table} (
    shard      int         PRIMARY KEY CHECK (shard >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {schema}.{shards_table} (shard) SELECT generate_series(0, {shards} - 1);

-- Computed by the server at insert: `publish` is unchanged. hashtextextended is the hash
-- PostgreSQL's own hash partitioning uses for text, kept stable across versions (pg_upgrade
-- keeps hash partitions valid). The mask keeps it non-negative. Adding it to a table that
-- holds rows rewrites the table (ACCESS EXCLUSIVE while it runs).
ALTER TABLE {schema}.{table} ADD COLUMN shard int NOT NULL
    GENERATED ALWAYS AS (((hashtextextended(aggregate_id, 0) & 9223372036854775807)
                          % {shards})::int) STORED;

-- A relay reads the pending rows of the shards it holds in position order: the shard is
-- checked inside the index (no heap visit for other relays' rows). One index rather than one
-- partial index per shard: a relay holds several shards and reads them in one ordered scan.
CREATE INDEX {shard_index} ON {schema}.{table} (position, shard) WHERE published_at IS NULL;

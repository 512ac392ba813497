-- The outbox table written by outbox.publish in the application's transaction.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE {schema}.{table} (
    -- Insertion order: orders events of one aggregate within a batch of finished transactions.
    position       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             uuid        NOT NULL,
    aggregate_type text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id   text        NOT NULL CHECK (aggregate_id <> ''),
    event_type     text        NOT NULL CHECK (event_type <> ''),
    topic          text,
    payload        bytea       NOT NULL,
    content_type   text        NOT NULL DEFAULT 'application/json',
    headers        jsonb       NOT NULL DEFAULT '{{}}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction's id: the polling relay only reads rows of transactions that
    -- are older than every transaction still running (snapshot xmin), so a late commit is
    -- never skipped and a rolled-back row is never seen.
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Set instead of deleting the row when the relay keeps published rows for a while.
    published_at   timestamptz
);

-- The polling relay reads unpublished rows in position order; the partial index stays as small
-- as the backlog, however many published rows are kept.
CREATE INDEX {pending_index} ON {schema}.{table} (position) WHERE published_at IS NULL;
-- Finds the rows of transactions that commit after the relay read past their position.
CREATE INDEX {txid_index} ON {schema}.{table} (txid) WHERE published_at IS NULL;

-- The idempotent consumer's dedup table (outbox.consumer): one row per event a consumer applied,
-- inserted in the same transaction as the handler's writes; a conflict means "already applied".
CREATE TABLE {schema}.{inbox_table} (
    consumer     text        NOT NULL CHECK (consumer <> ''),
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- `outbox inbox purge --older-than` deletes by age. The index is left unnamed on purpose:
-- PostgreSQL derives its name from the configured inbox table, so two inbox tables in one
-- schema never collide.
CREATE INDEX ON {schema}.{inbox_table} (processed_at);

-- The whole current outbox schema with the default names (schema "public", table "outbox").
-- Documentation: `outbox migrate up` creates exactly this (tests/integration/test_migrate.py
-- checks it). Use `outbox migrate sql --schema S --table T` for other names.

CREATE TABLE public.outbox (
    position       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             uuid        NOT NULL,
    aggregate_type text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id   text        NOT NULL CHECK (aggregate_id <> ''),
    event_type     text        NOT NULL CHECK (event_type <> ''),
    topic          text,
    payload        bytea       NOT NULL,
    content_type   text        NOT NULL DEFAULT 'application/json',
    headers        jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX outbox_txid_idx ON public.outbox (txid, position);

-- The whole current outbox schema with the default names (schema "public", table "outbox").
-- Documentation: `outbox migrate up` creates exactly this (tests/integration/test_migrate.py
-- checks it). Use `outbox migrate sql --schema S --table T` for other names.

-- 0001: the outbox table written by outbox.publish in the application's transaction.
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
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    published_at   timestamptz
);
CREATE INDEX outbox_pending_idx ON public.outbox (position) WHERE published_at IS NULL;
CREATE INDEX outbox_txid_idx ON public.outbox (txid) WHERE published_at IS NULL;

-- 0002: events the relay could never publish, and the notification that wakes the relay.
CREATE TABLE public.outbox_parked (
    id             uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    topic          text,
    payload        bytea       NOT NULL,
    content_type   text        NOT NULL,
    headers        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    reason         text        NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION public.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_public', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify_trigger AFTER INSERT ON public.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION public.outbox_notify();

-- 0003: the idempotent consumer's dedup table (one row per event a consumer applied).
CREATE TABLE public.outbox_inbox (
    consumer     text        NOT NULL CHECK (consumer <> ''),
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX outbox_inbox_processed_at_idx ON public.outbox_inbox (processed_at);

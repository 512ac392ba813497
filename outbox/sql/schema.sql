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
    published_at   timestamptz,
    commit_lsn     pg_lsn
);
CREATE INDEX outbox_pending_idx ON public.outbox (position) WHERE published_at IS NULL;
CREATE INDEX outbox_txid_idx ON public.outbox (txid) WHERE published_at IS NULL;
-- (commit_lsn is added by 0005: the WAL relay's commit order of a kept row, for replay.)

-- 0002: events the relay could never publish, and the notification that wakes the relay.
CREATE TABLE public.outbox_parked (
    parked_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             uuid        UNIQUE,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    topic          text,
    payload        bytea,
    content_type   text,
    headers        jsonb,
    created_at     timestamptz,
    raw            jsonb,
    reason         text        NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (raw IS NOT NULL OR (id IS NOT NULL AND aggregate_type IS NOT NULL
        AND aggregate_id IS NOT NULL AND event_type IS NOT NULL AND payload IS NOT NULL
        AND content_type IS NOT NULL AND headers IS NOT NULL))
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

-- 0004: the WAL relay's acknowledged position per slot (written before the slot is confirmed),
-- the server and timeline it was read on, and a slot recovery under way.
CREATE TABLE public.outbox_relay_position (
    slot                   text        PRIMARY KEY,
    acknowledged_lsn       pg_lsn,
    acknowledged_commit_at timestamptz,
    acknowledged_system    text,
    acknowledged_timeline  integer,
    recovery_started_at    timestamptz,
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- 0007: per-aggregate sequence numbers: the writer's counter (Outbox(sequence=True)) and the
-- consumer's last applied number (Consumer(ordering="sequence")).
CREATE TABLE public.outbox_sequence (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL CHECK (last_sequence > 0),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE public.outbox_inbox_sequence (
    consumer       text   NOT NULL CHECK (consumer <> ''),
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL CHECK (last_sequence > 0),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);

-- What the polling relay needs besides the outbox table: a place for events that can never be
-- published, and the notification that wakes it up.

CREATE TABLE {schema}.{parked_table} (
    parked_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The event, when it could be read as one (it was then refused by Kafka). A change the WAL
    -- relay could not read as an event at all has only `raw` (the columns or message as sent).
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

-- One notification per inserting statement (not per row); NOTIFYs with the same payload in a
-- transaction are folded into one, delivered at commit.
CREATE FUNCTION {schema}.{notify_function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$$;

CREATE TRIGGER {notify_trigger} AFTER INSERT ON {schema}.{table}
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{notify_function}();

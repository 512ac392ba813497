-- What the polling relay needs besides the outbox table: a place for events that can never be
-- published, and the notification that wakes it up.

CREATE TABLE {schema}.{parked_table} (
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

-- Per-aggregate sequence numbers (Outbox(sequence=True), Consumer(ordering="sequence")).
--
-- The writer's counter: one row per aggregate, holding the last number given. publish() bumps
-- it with INSERT ... ON CONFLICT DO UPDATE ... RETURNING in the caller's transaction, so writers
-- of one aggregate wait for each other's commit on this row (and numbers have no gap over
-- committed transactions), while writers of other aggregates never wait.
CREATE TABLE {schema}.{sequence_table} (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL CHECK (last_sequence > 0),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The consumer's last applied number per aggregate, written in the transaction of the inbox
-- rows: at or below it is a duplicate, the next one is applied, beyond it is a gap.
CREATE TABLE {schema}.{inbox_sequence_table} (
    consumer       text   NOT NULL CHECK (consumer <> ''),
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL CHECK (last_sequence > 0),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);

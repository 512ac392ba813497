-- The WAL relay's row per slot: how far it has acknowledged (written before the slot is confirmed,
-- so it survives the slot: relay/wal/recovery.py reads it after a loss), and a slot recovery
-- under way (relay/wal/recovery_state.py): set before the lost slot is dropped, cleared once
-- every row the new slot cannot send is in Kafka. While it is set no relay streams from the
-- slot: one made by an unfinished recovery starts after unpublished rows.
CREATE TABLE {schema}.{position_table} (
    slot                   text        PRIMARY KEY,
    acknowledged_lsn       pg_lsn,
    acknowledged_commit_at timestamptz,
    recovery_started_at    timestamptz,
    updated_at             timestamptz NOT NULL DEFAULT now()
);

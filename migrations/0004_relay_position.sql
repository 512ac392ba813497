-- The WAL relay's row per slot: how far it has acknowledged (written before the slot is confirmed,
-- so it survives the slot: relay/wal/recovery.py reads it after a loss), and a slot recovery
-- under way (relay/wal/recovery_state.py): set before the lost slot is dropped, cleared once
-- every row the new slot cannot send is in Kafka. While it is set no relay streams from the
-- slot: one made by an unfinished recovery starts after unpublished rows.
-- acknowledged_system and _timeline: where the position was read (IDENTIFY_SYSTEM's system
-- identifier and timeline). An LSN means something only there: a restored dump is another server,
-- a failover or a point-in-time recovery another timeline, and their LSNs can repeat those of the
-- position. The relay skips transactions below a recorded position only on the server and
-- timeline it was recorded on (relay/wal/position.py).
CREATE TABLE {schema}.{position_table} (
    slot                   text        PRIMARY KEY,
    acknowledged_lsn       pg_lsn,
    acknowledged_commit_at timestamptz,
    acknowledged_system    text,
    acknowledged_timeline  integer,
    recovery_started_at    timestamptz,
    updated_at             timestamptz NOT NULL DEFAULT now()
);

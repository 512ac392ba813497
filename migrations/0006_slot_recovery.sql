-- A slot recovery under way (relay/wal/recovery.py): set before the lost slot is dropped,
-- cleared once every row the new slot cannot send is in Kafka. While it is set no relay
-- streams from the slot: one made by an unfinished recovery starts after unpublished rows.
ALTER TABLE {schema}.{position_table} ADD COLUMN recovery_started_at timestamptz;

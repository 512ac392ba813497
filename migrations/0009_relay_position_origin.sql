-- Where the WAL relay's acknowledged position was read: the server (IDENTIFY_SYSTEM's system
-- identifier) and its timeline. An LSN means something only there: a restored dump is another
-- server, a failover or a point-in-time recovery another timeline, and their LSNs can repeat
-- those of the position. The relay skips transactions below a recorded position only on the
-- server and timeline it was recorded on (relay/wal/position.py).
ALTER TABLE {schema}.{position_table}
    ADD COLUMN acknowledged_system   text,
    ADD COLUMN acknowledged_timeline integer;

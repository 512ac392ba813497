-- The WAL relay's acknowledged position in its slot's row of {position_table} (migrations/0004):
-- relay/wal/position.py reads it, relay/wal/cleanup.py writes it.

-- name: recorded
SELECT acknowledged_lsn::text, acknowledged_commit_at, acknowledged_system, acknowledged_timeline
FROM {schema}.{position_table}
WHERE slot = %(slot)s

-- name: record
-- Written, and committed, before the slot is confirmed at `lsn`. {condition} is empty, or makes
-- it part of remove_and_record.
INSERT INTO {schema}.{position_table} AS p
    (slot, acknowledged_lsn, acknowledged_commit_at, acknowledged_system, acknowledged_timeline)
SELECT %(slot)s, %(lsn)s::pg_lsn, %(commit_at)s::timestamptz, %(system)s, %(timeline)s::integer
{condition}
ON CONFLICT (slot) DO UPDATE
SET acknowledged_lsn = excluded.acknowledged_lsn,
    acknowledged_commit_at = excluded.acknowledged_commit_at,
    acknowledged_system = excluded.acknowledged_system,
    acknowledged_timeline = excluded.acknowledged_timeline,
    updated_at = now()

-- name: remove_and_record
-- One statement (one round trip, one transaction): a chunk of the rows of acknowledged
-- transactions leaves the table ({remove}: published.sql's delete_transactions or
-- mark_transactions), and the last chunk (fewer rows than the chunk size) records the position
-- ({record}). So the position never names a transaction whose rows are still waiting to go.
WITH removed AS ({remove} RETURNING 1),
recorded AS ({record})
SELECT count(*) FROM removed

-- name: last_chunk
-- The condition of record in remove_and_record: this statement removed the last rows.
WHERE (SELECT count(*) FROM removed) < %(chunk)s

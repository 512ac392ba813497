-- A slot recovery in progress (relay/wal/recovery_state.py), in the WAL relay's row of its slot
-- in {position_table} (migrations/0004).

-- name: pending
SELECT recovery_started_at FROM {schema}.{position_table} WHERE slot = %(slot)s

-- name: begin
-- Recorded before the lost slot is dropped: from here until `end`, no relay streams from the
-- slot (a new one made by an unfinished recovery starts after unpublished rows).
INSERT INTO {schema}.{position_table} AS p (slot, recovery_started_at)
VALUES (%(slot)s, now())
ON CONFLICT (slot) DO UPDATE SET recovery_started_at = coalesce(p.recovery_started_at, now())

-- name: end
-- Everything committed before the new slot's consistent point is in Kafka now: that is the
-- position, exactly (not the greatest of it and the old one: after a failover to a standby
-- that was behind, the old position can lie beyond the new slot's start). It names no server
-- (acknowledged_system NULL), so no relay skips anything by it (relay/wal/position.py); the
-- new slot sends nothing before it anyway. Its commit time is unknown: the recovery's start,
-- before the slot was made, is a bound that errs on the safe side.
UPDATE {schema}.{position_table}
SET acknowledged_lsn = %(lsn)s::pg_lsn, acknowledged_commit_at = recovery_started_at,
    acknowledged_system = NULL, acknowledged_timeline = NULL,
    recovery_started_at = NULL, updated_at = now()
WHERE slot = %(slot)s

-- name: try_lock
-- One recovery per slot at a time (a relay's, or `outbox slot recover`); a session lock, so a
-- process that dies releases it.
SELECT pg_try_advisory_lock(%(key)s)

-- name: unlock
SELECT pg_advisory_unlock(%(key)s)

-- name: acknowledged
-- How far the slot's relay had acknowledged, as it recorded (relay/wal/relay.py).
SELECT acknowledged_lsn::text, acknowledged_commit_at FROM {schema}.{position_table}
WHERE slot = %(slot)s

-- name: mark_recovered
-- With keep_published, the rows a recovery published: marked with the new slot's consistent
-- point as their commit order for `outbox replay` (relay/wal/recovery.py `CatchUpSource`),
-- and the topic they were sent to ({set_topic}: relay/published.py kept_topic).
UPDATE {schema}.{table} SET published_at = now(), commit_lsn = %(lsn)s::pg_lsn{set_topic}
WHERE position = ANY(%(positions)s)

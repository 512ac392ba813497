-- Queries behind `outbox parked list | retry` (relay/parked.py).

-- name: list
-- Grouped by key, each key's events in the order they were parked (the order retry re-queues
-- them in); unreadable changes, which have no key, last.
SELECT parked_id, id, aggregate_type, aggregate_id, event_type, topic, length(payload), reason,
       parked_at, raw IS NOT NULL
FROM {schema}.{parked_table}
ORDER BY raw IS NOT NULL, aggregate_type, aggregate_id, parked_id
LIMIT %(limit)s

-- name: holds
-- The keys a relay holds at start-up, each behind its first parked event (relay/holds.py).
SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, id
FROM {schema}.{parked_table}
WHERE raw IS NULL
ORDER BY aggregate_type, aggregate_id, parked_id

-- name: retry
-- Re-queues the parked events of the keys asked for (all keys, or the keys of the given ids),
-- every parked event of such a key, in the order they were parked: the first is the one the key
-- is held behind, so the key's order survives. They become new outbox rows (new positions, in
-- that order) and leave the parked table, in one transaction. Unreadable changes (raw only)
-- cannot be re-queued: they stay until someone repairs or deletes them.
WITH wanted AS (
    SELECT DISTINCT aggregate_type, aggregate_id
    FROM {schema}.{parked_table}
    WHERE raw IS NULL AND (%(all)s OR id = ANY(%(ids)s::uuid[]))
), moved AS (
    DELETE FROM {schema}.{parked_table} AS p
    USING wanted AS w
    WHERE p.raw IS NULL AND p.aggregate_type = w.aggregate_type
      AND p.aggregate_id = w.aggregate_id
    RETURNING p.id, p.aggregate_type, p.aggregate_id, p.event_type, p.topic, p.payload,
              p.content_type, p.headers, coalesce(p.created_at, p.parked_at) AS created_at,
              p.parked_id
)
INSERT INTO {schema}.{table}
    (id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
     created_at)
SELECT id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
       created_at
FROM moved
ORDER BY parked_id
RETURNING id

-- name: park_event
-- An event Kafka refused for good (WAL relay: the row is not in a table to move it from).
INSERT INTO {schema}.{parked_table}
    (id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
     created_at, reason)
VALUES (%(id)s, %(aggregate_type)s, %(aggregate_id)s, %(event_type)s, %(topic)s, %(payload)s,
        %(content_type)s, %(headers)s, coalesce(%(created_at)s, now()), %(reason)s)
-- Parked again (a WAL relay re-reading what it parked before a restart): the first reason and
-- place stay, so the key's order among its parked events does not change.
ON CONFLICT (id) DO NOTHING

-- name: park_raw
-- A change of the outbox that could not be read as an event at all.
INSERT INTO {schema}.{parked_table} (raw, reason) VALUES (%(raw)s, %(reason)s)

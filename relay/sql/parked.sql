-- Queries behind `outbox parked list | retry` (relay/parked.py).

-- name: list
SELECT parked_id, id, aggregate_type, aggregate_id, event_type, topic, length(payload), reason,
       parked_at, raw IS NOT NULL
FROM {schema}.{parked_table}
ORDER BY parked_id
LIMIT %(limit)s

-- name: retry
-- Re-queues parked events as new outbox rows (new position: they go after what is pending now)
-- and removes them from the parked table, in one transaction. Unreadable changes (raw only)
-- cannot be re-queued: they stay until someone repairs or deletes them.
WITH moved AS (
    DELETE FROM {schema}.{parked_table}
    WHERE raw IS NULL AND (%(all)s OR id = ANY(%(ids)s::uuid[]))
    RETURNING id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
              headers, coalesce(created_at, parked_at) AS created_at, parked_id
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
ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, parked_at = now()

-- name: park_raw
-- A change of the outbox that could not be read as an event at all.
INSERT INTO {schema}.{parked_table} (raw, reason) VALUES (%(raw)s, %(reason)s)

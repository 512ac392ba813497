-- Queries behind `outbox parked list | retry` (relay/parked.py).

-- name: list
SELECT id, aggregate_type, aggregate_id, event_type, topic, length(payload), reason, parked_at
FROM {schema}.{parked_table}
ORDER BY parked_at, id
LIMIT %(limit)s

-- name: retry
-- Re-queues parked events as new outbox rows (new position: they go after what is pending now)
-- and removes them from the parked table, in one transaction.
WITH moved AS (
    DELETE FROM {schema}.{parked_table}
    WHERE %(all)s OR id = ANY(%(ids)s::uuid[])
    RETURNING id, aggregate_type, aggregate_id, event_type, topic, payload, content_type,
              headers, created_at, parked_at
)
INSERT INTO {schema}.{table}
    (id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
     created_at)
SELECT id, aggregate_type, aggregate_id, event_type, topic, payload, content_type, headers,
       created_at
FROM moved
ORDER BY parked_at, id
RETURNING id

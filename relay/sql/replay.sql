-- `outbox replay` (relay/replay.py): the retained (published) rows that match a filter. Every
-- filter is optional (NULL or an empty array matches all); the command refuses an empty filter
-- unless --all. `select_list` and `tail` are composed by relay/replay.py: the events in commit
-- order, or their routes counted per topic. The event columns are composed from the column
-- mapping like the polling relay's (relay/poll/relay.py `event_select_list`).

-- name: matching
-- Order: the WAL relay's commit LSN where it set one (migrations/0005), else position, the
-- polling relay's order; rows without one (published by the polling relay, or by a relay before
-- 0005) come first. Rows parked after being marked (the WAL relay marks a transaction whole) were
-- never in Kafka and are left out. One sequential scan: retained rows have no index but their
-- primary key, and replay is rare; an index would cost every publish.
SELECT {select_list}
FROM {schema}.{table} AS t
WHERE t.published_at IS NOT NULL
  AND (%(aggregate_type)s::text IS NULL OR {aggregate_type} = %(aggregate_type)s::text)
  AND (cardinality(%(aggregate_ids)s::text[]) = 0
       OR {aggregate_id} = ANY(%(aggregate_ids)s::text[]))
  AND (cardinality(%(event_ids)s::text[]) = 0 OR {id}::text = ANY(%(event_ids)s::text[]))
  AND (%(since)s::timestamptz IS NULL OR {created_at} >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR {created_at} < %(until)s::timestamptz)
  AND NOT EXISTS (SELECT FROM {schema}.{parked_table} AS p WHERE p.id::text = {id}::text)
{tail}

-- name: begin_snapshot
-- The count (for the ETA) and the events come from one snapshot; the rows stay readable while
-- the relay purges expired ones meanwhile.
BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY

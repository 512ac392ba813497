-- The statements of Outbox.publish (outbox/statements.py, outbox/copy_rows.py). Each is composed
-- once per (names, columns, driver) and cached: the publish path only binds values. {columns},
-- {arrays}, {prefix} and {messages} are filled in Python from the table's layout
-- (outbox/columns.py) in the driver's parameter style: psycopg's %(name)s or SQLAlchemy's :name.

-- name: insert_events
-- One round trip per batch, however many events: unnest keeps the order of the arrays, so rows
-- are inserted in the order given.
INSERT INTO {schema}.{table} ({columns}) SELECT * FROM unnest({arrays})

-- name: emit_messages
-- transactional=true: the message is decoded only if, and when, the transaction commits.
SELECT count(pg_logical_emit_message(true, {prefix}, m)) FROM unnest({messages}) AS m

-- name: copy_events
-- Binary COPY into the table `outbox migrate` creates, whose column types are known exactly.
COPY {schema}.{table} ({columns}) FROM STDIN (FORMAT BINARY)

-- name: next_sequences
-- Outbox(sequence=True): add each aggregate's event count to its counter and return the new last
-- number (the batch's numbers end there). The row lock taken here is held until the caller's
-- commit: writers of one aggregate serialise, others never wait. Rows are locked in the order
-- given (the writer sorts the aggregates), so two writers of the same aggregates cannot deadlock.
INSERT INTO {schema}.{sequence_table} AS s (aggregate_type, aggregate_id, last_sequence)
SELECT t, i, n FROM unnest({types}, {ids}, {counts}) WITH ORDINALITY AS k(t, i, n, o) ORDER BY o
ON CONFLICT (aggregate_type, aggregate_id)
DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
RETURNING aggregate_type, aggregate_id, last_sequence

-- name: check_table
-- Whether this role may write into the outbox table, which must exist (the cast fails if it does
-- not): the consumer's start-up check when its command handlers reply through the outbox. The
-- writer's right is INSERT alone (deploy/roles.sql), so nothing more is asked. {relation} is the
-- quoted name as a literal; CAST, not `::`, which SQLAlchemy's text() would parse.
SELECT has_table_privilege(CAST({relation} AS regclass), 'INSERT')

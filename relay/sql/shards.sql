-- Several relays over one sharded outbox (relay/shards.py): leases of shards (polling relays)
-- or shard groups (WAL relays), and the relays' membership, as session advisory locks.

-- name: try_shard
-- A shard's lease: a session advisory lock (table key, shard), taken on the connection that reads
-- and deletes the shard's rows, so it ends with the session that publishes them.
SELECT pg_try_advisory_lock(%(key)s::int, %(shard)s::int)

-- name: join_relays
-- A live relay holds (table key, -its backend pid) on its membership connection for as long as
-- it runs: the relays sharing the outbox count these.
SELECT pg_try_advisory_lock(%(key)s::int, -pg_backend_pid())

-- name: lease
-- The server ends a session idle for longer than the lease (a hung or cut-off relay), and its
-- locks with it; a relay touches its sessions more often than that.
SELECT set_config('idle_session_timeout', %(lease)s, false)

-- name: touch
SELECT 1

-- name: shard_locks
-- The advisory locks of the table key: (table key, shard) held by the shard's owner, (table key,
-- -pid) by each live relay. Two-int locks show in pg_locks with classid = the first key, objid =
-- the second (as unsigned 32-bit oids) and objsubid 2. Readable by every role.
SELECT l.objid::bigint, l.pid, a.client_addr::text, a.application_name
FROM pg_catalog.pg_locks l
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND l.classid = %(classid)s::bigint::oid
  AND l.objsubid = 2
  AND l.granted

-- Least-privilege roles for the outbox: a writer, a polling relay, a WAL relay and a consumer.
--
-- Run it with psql, as a superuser (only a superuser may give the REPLICATION attribute), in the
-- outbox's database, after `outbox migrate up`:
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -v schema=public -v table=outbox -f deploy/roles.sql
--
-- Variables, all optional:
--   schema, table        the outbox (default public, outbox); the parked table is <table>_parked,
--                        the WAL relay's position table <table>_relay_position, the
--                        writer's sequence counter <table>_sequence
--   inbox_table          the consumer's dedup table (default outbox_inbox); its sequence
--                        numbers are in <inbox_table>_sequence
--   prefix               role names <prefix>_app, <prefix>_relay_poll, <prefix>_relay_wal,
--                        <prefix>_consumer (default outbox)
--   app_password, poll_password, wal_password, consumer_password
--                        without one the role gets no password; prefer setting it afterwards
--                        with psql's \password ROLE, which keeps it out of `ps` and the history
--   restrict_messages    on: only the app role may call pg_logical_emit_message in this database
--                        (default off; see the end of this file)
--
-- Roles belong to the cluster, grants to one database: run the script again in every database
-- that holds an outbox or an inbox. Running it twice is safe (existing roles are altered, grants
-- repeat). Applications that already have a role get the writer's rights by membership:
-- GRANT outbox_app TO orders_service. Managed services differ for REPLICATION: on Amazon RDS
-- grant rds_replication instead; on Cloud SQL the role needs the REPLICATION attribute from
-- cloudsqlsuperuser. docs/operations.md explains each role.

\set ON_ERROR_STOP on

\if :{?schema}
\else
\set schema public
\endif
\if :{?table}
\else
\set table outbox
\endif
\if :{?inbox_table}
\else
\set inbox_table outbox_inbox
\endif
\if :{?prefix}
\else
\set prefix outbox
\endif
\if :{?restrict_messages}
\else
\set restrict_messages off
\endif

\set parked_table :table '_parked'
\set position_table :table '_relay_position'
\set sequence_table :table '_sequence'
\set inbox_sequence_table :inbox_table '_sequence'
\set shards_table :table '_shards'
\set app_role :prefix '_app'
\set poll_role :prefix '_relay_poll'
\set wal_role :prefix '_relay_wal'
\set consumer_role :prefix '_consumer'

BEGIN;

SELECT pg_catalog.format('CREATE ROLE %I', name)
FROM (VALUES (:'app_role'), (:'poll_role'), (:'wal_role'), (:'consumer_role')) AS r(name)
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r.name)
\gexec

-- Every attribute spelled out, so that re-running the script also takes back anything granted
-- by hand since. Only the WAL relay needs REPLICATION: it opens a replication connection.
ALTER ROLE :"app_role"
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
ALTER ROLE :"poll_role"
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
ALTER ROLE :"wal_role"
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE REPLICATION NOBYPASSRLS INHERIT;
ALTER ROLE :"consumer_role"
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;

\if :{?app_password}
ALTER ROLE :"app_role" PASSWORD :'app_password';
\endif
\if :{?poll_password}
ALTER ROLE :"poll_role" PASSWORD :'poll_password';
\endif
\if :{?wal_password}
ALTER ROLE :"wal_role" PASSWORD :'wal_password';
\endif
\if :{?consumer_password}
ALTER ROLE :"consumer_role" PASSWORD :'consumer_password';
\endif

-- CONNECT is PUBLIC's by default; granted explicitly for databases where it was revoked.
GRANT CONNECT ON DATABASE :"DBNAME" TO :"app_role", :"poll_role", :"wal_role", :"consumer_role";
GRANT USAGE ON SCHEMA :"schema" TO :"app_role", :"poll_role", :"wal_role", :"consumer_role";

-- Writer (outbox.publish): INSERT only. The identity column needs no sequence privilege, and the
-- notify trigger's function is executable by PUBLIC. Table-less mode (mode="message") calls
-- pg_logical_emit_message, which PostgreSQL lets every role call (no REPLICATION needed).
GRANT INSERT ON :"schema".:"table" TO :"app_role";
-- Outbox(sequence=True) numbers events per aggregate with INSERT ... ON CONFLICT DO UPDATE ...
-- RETURNING on the counter table: INSERT, UPDATE and SELECT.
GRANT SELECT, INSERT, UPDATE ON :"schema".:"sequence_table" TO :"app_role";

-- Polling relay: reads committed rows, deletes them (UPDATE marks them with keep_published).
-- Parking is INSERT ... ON CONFLICT DO UPDATE on the parked table, which needs SELECT and
-- UPDATE as well as INSERT. LISTEN and advisory locks (the leader election) need no grant.
-- Re-queueing parked events (`outbox parked retry`) inserts into the outbox and deletes parked
-- rows: an operator's action, run as the owner, not something the relay's role may do.
GRANT SELECT, UPDATE, DELETE ON :"schema".:"table" TO :"poll_role";
GRANT SELECT, INSERT, UPDATE ON :"schema".:"parked_table" TO :"poll_role";
-- The leader's advisory lock is released when the server ends its session. A relay whose host
-- died or was cut off sends no FIN: with the kernel's keepalive defaults the server would hold
-- its session (and keep the standbys waiting) for over two hours; with these, about a minute.
ALTER ROLE :"poll_role" SET tcp_keepalives_idle = 30;
ALTER ROLE :"poll_role" SET tcp_keepalives_interval = 10;
ALTER ROLE :"poll_role" SET tcp_keepalives_count = 3;
-- A sharded outbox (`outbox migrate up --shards N`; run this script again after sharding): the
-- polling relays read the shard count from its shards table. Their leases are advisory locks,
-- counted in pg_locks (readable by every role); no grant for those.
SELECT pg_catalog.format('GRANT SELECT ON %I.%I TO %I', :'schema', :'shards_table', :'poll_role')
WHERE pg_catalog.to_regclass(pg_catalog.format('%I.%I', :'schema', :'shards_table')) IS NOT NULL
\gexec

-- WAL relay: LOGIN REPLICATION is what streaming needs; pgoutput checks no table privilege.
-- It removes the rows it published from the outbox (DELETE, which needs SELECT for its WHERE;
-- the same SELECT lets this role run `outbox status` and `outbox doctor`), and with
-- --keep-published marks them first: UPDATE of the published_at, commit_lsn and topic columns
-- only (commit_lsn: the commit order `outbox replay` follows, migrations/0005; topic: the topic
-- the event was sent to, where `outbox replay` sends it again).
-- Creating the publication (owner of the table) and the slot (REPLICATION) is a setup step run
-- by an administrator (relay.wal.source.setup, docs/operations.md): the relay never creates a
-- slot, so a lost slot stops it instead of silently skipping events.
-- REPLICATION is a strong attribute: with a `replication` line in pg_hba.conf the role could
-- stream the whole cluster's WAL (physical replication). Logical replication connections match
-- the database's own pg_hba.conf lines, so give this role none of the `replication` lines.
GRANT SELECT, DELETE ON :"schema".:"table" TO :"wal_role";
GRANT UPDATE (published_at, commit_lsn, topic) ON :"schema".:"table" TO :"wal_role";
-- The WAL relay parks events Kafka refused, and changes it could not read, in the parked table
-- (INSERT ... ON CONFLICT DO UPDATE: also SELECT and UPDATE).
GRANT SELECT, INSERT, UPDATE ON :"schema".:"parked_table" TO :"wal_role";
-- Its row per slot in the position table: how far Kafka acknowledged (the relay writes it before
-- confirming its slot, and reads it at start to skip what the server sends again), and a slot
-- recovery under way (--on-slot-loss recover and `outbox slot recover` insert and update it).
GRANT SELECT, INSERT, UPDATE ON :"schema".:"position_table" TO :"wal_role";

-- Both relays may read the migration bookkeeping, so `outbox doctor` run with the relay's own
-- URL can tell whether the schema is up to date.
GRANT SELECT ON :"schema".outbox_migrations TO :"poll_role", :"wal_role";

-- Idempotent consumer: claims event ids (INSERT ... ON CONFLICT DO NOTHING RETURNING), and
-- `outbox inbox purge` deletes old rows.
GRANT SELECT, INSERT, DELETE ON :"schema".:"inbox_table" TO :"consumer_role";
-- ordering="sequence": the last applied number per aggregate, read (FOR UPDATE) and upserted in
-- the transaction of the inbox rows.
GRANT SELECT, INSERT, UPDATE ON :"schema".:"inbox_sequence_table" TO :"consumer_role";

-- pg_logical_emit_message is executable by PUBLIC, so any role that may connect to this
-- database could write a message with the outbox's prefix, which a WAL relay reading messages
-- publishes as an event. With restrict_messages=on only the app role (and superusers) may emit
-- messages here. Other users of logical decoding messages in this database need a GRANT then.
\if :restrict_messages
SELECT pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', p.oid::regprocedure)
FROM pg_catalog.pg_proc p
WHERE p.proname = 'pg_logical_emit_message'
  AND p.pronamespace = 'pg_catalog'::regnamespace
\gexec
SELECT pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', p.oid::regprocedure, :'app_role')
FROM pg_catalog.pg_proc p
WHERE p.proname = 'pg_logical_emit_message'
  AND p.pronamespace = 'pg_catalog'::regnamespace
\gexec
\endif

COMMIT;

-- TEMPORARY (replaced by the position engineer's file on merge)
CREATE TABLE {schema}.{position_table} (
    slot                  text        PRIMARY KEY,
    acknowledged_lsn      pg_lsn,
    acknowledged_commit_at timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

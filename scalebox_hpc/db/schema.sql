-- The schema's own bookkeeping (scalebox_hpc/db/__init__.py: upgrade, schema_version).
-- Named queries of every .sql file here are loaded by name, which is unique across
-- the files; placeholders are psycopg named parameters, and a name after @ (@READY,
-- @LEASE_LOST) is a task status or code of scalebox_hpc/states.py, put in as a number.

-- name: schema_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM schema_migrations;

-- name: schema_lock
-- Serialises concurrent upgrades (two commands starting on a fresh database).
SELECT pg_advisory_xact_lock(726001);

-- name: schema_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: schema_applied
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s);

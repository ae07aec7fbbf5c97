-- Pilots (issue 11): a worker is one process per node that runs many tasks at once, of
-- any module of its site's running apps. Statuses are literals here (states.py):
-- -1 READY, -2 QUEUED, -3 RUNNING.

-- What the pilot has (from Slurm's variables or the site config), written when it starts.
ALTER TABLE workers ADD COLUMN cpus integer;
ALTER TABLE workers ADD COLUMN gpus integer;
ALTER TABLE workers ADD COLUMN mem_mb bigint;

-- The pilot's lane a claimed task runs in: (worker_id, slot) is one place a task runs.
ALTER TABLE tasks ADD COLUMN slot integer;
-- What each attempt had: its lane, cores and GPU ids.
ALTER TABLE task_exec ADD COLUMN slot integer;
ALTER TABLE task_exec ADD COLUMN cpus integer;
ALTER TABLE task_exec ADD COLUMN gpus text;

-- 'slots' is the most tasks of a module running at once across the app: the claim
-- counts the held tasks of a module, and this index holds only those.
CREATE INDEX tasks_held ON tasks (module_id) WHERE status IN (-2, -3);

-- The pilot's claim, one call per cycle for all its free lanes. Entries come in the
-- order the pilot's policy chose (scalebox_hpc/policy.py), those of one module next to
-- each other: (module, lane, how many tasks the lane takes in a row). For each module:
--   * its app must be RUNNING, and the pilot RUNNING (not lost, not draining);
--   * 'slots' holds across all pilots: lanes holding tasks of the module are counted
--     under a transaction-scoped advisory lock on the module, so two pilots claiming
--     at once cannot both take the last free slot;
--   * upstream's per-host 'hosts: [h:n]' (definition.host_slots) holds per host: a
--     host not named there runs none of its tasks;
--   * a HOST-BOUND module's tasks that name a to_host run only on that host;
--   * once a lane got fewer tasks than it asked for, the module's later lanes are skipped.
CREATE FUNCTION sbx_claim(p_worker bigint, p_host text, p_modules bigint[], p_slots integer[],
                          p_batches integer[])
RETURNS TABLE (id bigint, module_id bigint, slot integer, body text, headers text, attempt integer,
               ready_at timestamptz, claimed_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    m bigint;
    cur bigint := NULL;
    skip boolean := false;
    busy bigint;
    host_busy bigint;
    cap integer;
    host_cap integer;
    per_host jsonb;
    bound boolean;
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = p_worker AND w.status = 'RUNNING') THEN
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_modules, 1), 0) LOOP
        m := p_modules[i];
        IF cur IS DISTINCT FROM m THEN
            cur := m;
            skip := true;
            SELECT mo.slots, mo.host_bound, mo.definition->'host_slots' INTO cap, bound, per_host
            FROM modules mo JOIN apps a ON a.id = mo.app_id
            WHERE mo.id = m AND a.status = 'RUNNING';
            CONTINUE WHEN NOT FOUND;
            PERFORM pg_advisory_xact_lock(72611, m::integer);
            SELECT count(DISTINCT (t.worker_id, t.slot)) INTO busy
            FROM tasks t WHERE t.module_id = m AND t.status IN (-2, -3);
            host_cap := NULL;
            IF per_host IS NOT NULL AND per_host <> '{}'::jsonb THEN
                host_cap := coalesce((per_host->>p_host)::integer, 0);
                SELECT count(DISTINCT (t.worker_id, t.slot)) INTO host_busy
                FROM tasks t JOIN workers w ON w.id = t.worker_id
                WHERE t.module_id = m AND t.status IN (-2, -3) AND w.host = p_host;
            END IF;
            skip := false;
        END IF;
        CONTINUE WHEN skip;
        IF busy >= cap OR (host_cap IS NOT NULL AND host_busy >= host_cap) THEN
            skip := true;
            CONTINUE;
        END IF;
        RETURN QUERY
        WITH c AS (
            SELECT t.id FROM tasks t
            WHERE t.module_id = m AND t.status = -1
              AND (NOT bound OR t.to_host IS NULL OR t.to_host = p_host)
            ORDER BY t.id
            LIMIT p_batches[i]
            FOR UPDATE SKIP LOCKED
        )
        UPDATE tasks t SET status = -2, worker_id = p_worker, slot = p_slots[i], attempts = t.attempts + 1,
                           claimed_at = now()
        FROM c WHERE t.id = c.id
        RETURNING t.id, t.module_id, t.slot, t.body, t.headers::text, t.attempts, t.ready_at, t.claimed_at;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            busy := busy + 1;
            host_busy := host_busy + 1;
        END IF;
        IF n < p_batches[i] THEN
            skip := true;       -- nothing more ready for this pilot
        END IF;
    END LOOP;
END;
$$;

-- A lane that already holds tasks of a module may claim more of them before it runs out
-- (a top-up), whatever the module's slots: it occupies one slot however many of the
-- module's tasks it holds. Pilots top a lane up when half its tasks are done, so a lane
-- of short tasks never waits for the claim of its next batch.

CREATE OR REPLACE FUNCTION sbx_claim(p_worker bigint, p_host text, p_modules bigint[], p_slots integer[],
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
    held boolean;
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
        held := EXISTS (SELECT 1 FROM tasks t WHERE t.worker_id = p_worker AND t.slot = p_slots[i]
                        AND t.module_id = m AND t.status IN (-2, -3));
        CONTINUE WHEN NOT held AND (busy >= cap OR (host_cap IS NOT NULL AND host_busy >= host_cap));
        RETURN QUERY
        WITH c AS (
            SELECT t.id FROM tasks t
            WHERE t.module_id BETWEEN m AND m AND t.status = -1
              AND (NOT bound OR t.to_host IS NULL OR t.to_host = p_host)
            ORDER BY t.module_id, t.id
            LIMIT p_batches[i]
            FOR UPDATE SKIP LOCKED
        )
        UPDATE tasks t SET status = -2, worker_id = p_worker, slot = p_slots[i], attempts = t.attempts + 1,
                           claimed_at = now()
        FROM c WHERE t.id = c.id
        RETURNING t.id, t.module_id, t.slot, t.body, t.headers::text, t.attempts, t.ready_at, t.claimed_at;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 AND NOT held THEN
            busy := busy + 1;
            host_busy := host_busy + 1;
        END IF;
        IF n < p_batches[i] THEN
            skip := true;       -- nothing more ready for this pilot
        END IF;
    END LOOP;
END;
$$;

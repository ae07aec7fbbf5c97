-- What a worker does to the queue (scalebox_hpc/db/queue.py): register, claim,
-- heartbeat, complete, hand back, sign off.

-- name: module_context
-- What a worker reads once at its start: its module, the app's main router, and every
-- module of the app (id, name, site, in id order) for routing and forwarding.
SELECT m.id, m.app_id, m.name, m.site, m.host_bound, m.definition, a.definition->>'main_router',
       array_agg(o.id ORDER BY o.id), array_agg(o.name ORDER BY o.id), array_agg(o.site ORDER BY o.id)
FROM modules m JOIN apps a ON a.id = m.app_id JOIN modules o ON o.app_id = m.app_id
WHERE m.id = %(module_id)s
GROUP BY m.id, a.id;

-- name: start_worker
UPDATE workers SET status = 'RUNNING', host = %(host)s, ip = %(ip)s, pid = %(pid)s,
       slurm_job_id = %(slurm_job_id)s, started_at = now(), heartbeat_at = now(),
       lease_expires = now() + make_interval(secs => %(lease_seconds)s),
       cpus = %(cpus)s, gpus = %(gpus)s, mem_mb = %(mem_mb)s
WHERE id = %(worker_id)s AND status = 'PENDING'
RETURNING module_id;

-- name: served_modules
-- The modules a pilot serves, with their app's state: those of every app that runs on
-- its site (a pipeline's next stage, and other apps, run in the same job); its home
-- app's whatever its state.
SELECT o.id, o.app_id, a.status FROM modules m JOIN modules o ON o.site = m.site JOIN apps a ON a.id = o.app_id
WHERE m.id = %(module_id)s AND (o.app_id = m.app_id OR a.status IN ('RUNNING', 'PAUSED'))
ORDER BY o.id;

-- name: claim_pilot
-- One claim for all of a pilot's free lanes (migrations/0004_pilots.sql, sbx_claim).
SELECT * FROM sbx_claim(%(worker_id)s, %(host)s, %(modules)s::bigint[], %(slots)s::integer[],
                        %(batches)s::integer[]);

-- name: heartbeat
-- Renews the lease on all of a worker's tasks at once (the lease lives on the worker),
-- and reads the state of each app it serves. No row back means the controller declared
-- this worker lost: it must stop at once.
UPDATE workers w SET lease_expires = now() + make_interval(secs => %(lease_seconds)s), heartbeat_at = now()
WHERE w.id = %(worker_id)s AND w.status IN ('RUNNING', 'DRAINING')
RETURNING (SELECT coalesce(jsonb_object_agg(a.id, a.status), '{}') FROM apps a
           WHERE a.id = ANY(%(app_ids)s::bigint[]));

-- name: stop_worker
UPDATE workers SET status = %(status)s, message = %(message)s, stopped_at = now()
WHERE id = %(worker_id)s AND status IN ('PENDING', 'RUNNING', 'DRAINING');

-- name: count_worker_failure
UPDATE modules SET worker_failures = worker_failures + 1
WHERE id = (SELECT module_id FROM workers WHERE id = %(worker_id)s);

-- name: claim_tasks
-- Batch claim. SKIP LOCKED lets concurrent workers take disjoint batches; a worker
-- that the controller declared lost, or a paused app, claims nothing.
WITH c AS (
    SELECT t.id FROM tasks t
    WHERE t.module_id BETWEEN %(module_id)s AND %(module_id)s AND t.status = @READY
      AND (NOT %(host_bound)s OR t.to_host IS NULL OR t.to_host = %(host)s)
      AND EXISTS (SELECT 1 FROM apps a WHERE a.id = %(app_id)s AND a.status = 'RUNNING')
      AND EXISTS (SELECT 1 FROM workers w WHERE w.id = %(worker_id)s AND w.status = 'RUNNING')
    ORDER BY t.module_id, t.id   -- only tasks_ready gives this order: see 0005_claim_order.sql
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t SET status = @QUEUED, worker_id = %(worker_id)s, attempts = t.attempts + 1, claimed_at = now()
FROM c WHERE t.id = c.id
RETURNING t.id, t.body, t.headers::text AS headers, t.attempts AS attempt, t.ready_at, t.claimed_at;

-- name: mark_running
UPDATE tasks SET status = @RUNNING
WHERE id = ANY(%(task_ids)s::bigint[]) AND worker_id = %(worker_id)s AND status = @QUEUED;

-- name: return_tasks
-- A draining worker hands back tasks it never started: no attempt is counted.
UPDATE tasks SET status = @READY, worker_id = NULL, attempts = attempts - 1, ready_at = now(), claimed_at = NULL
WHERE (%(task_ids)s::bigint[] IS NULL OR id = ANY(%(task_ids)s::bigint[]))
  AND worker_id = %(worker_id)s AND status IN (@QUEUED, @RUNNING)
RETURNING module_id;

-- name: exec_counts
-- How many earlier attempts of these tasks ended with each code (for retry rules).
SELECT task_id, status_code, count(*) FROM task_exec
WHERE task_id = ANY(%(task_ids)s) GROUP BY task_id, status_code;

-- name: complete_tasks
-- Only the attempt this worker still holds may complete: a late answer from an
-- attempt whose lease was recovered changes nothing (exactly-once routing).
-- Held is written as a range (-4 < status < -1, i.e. QUEUED or RUNNING), not IN (-2, -3):
-- IN matches the partial indexes of held tasks, whose statistics (taken when none were
-- held) promise one row, and the planner then joined every held task to every element
-- of the arrays: 90,000 comparisons and 17 ms for a batch of 300. The range leaves it
-- one primary-key lookup per element (2 ms).
UPDATE tasks t
SET status = x.status,
    worker_id = CASE WHEN x.status = @READY THEN NULL ELSE t.worker_id END,
    ready_at = CASE WHEN x.status = @READY THEN now() ELSE t.ready_at END,
    finished_at = CASE WHEN x.status = @READY THEN NULL ELSE now() END
FROM unnest(%(task_ids)s::bigint[], %(attempts)s::integer[], %(statuses)s::integer[]) AS x(id, attempt, status)
WHERE t.id = x.id AND t.worker_id = %(worker_id)s AND t.status > @RUNNING - 1 AND t.status < @QUEUED + 1
  AND t.attempts = x.attempt
RETURNING t.id, t.status;

-- name: count_done
-- A worker that got work done ends the run of failed workers of its module and of the
-- modules it completed tasks of.
WITH w AS (UPDATE workers SET tasks_done = tasks_done + %(n)s WHERE id = %(worker_id)s RETURNING module_id)
UPDATE modules m SET worker_failures = 0 FROM w
WHERE (m.id = w.module_id OR m.id = ANY(%(module_ids)s::bigint[])) AND m.worker_failures <> 0;

-- name: apply_semaphore
INSERT INTO semaphores AS s (app_id, name, value)
VALUES (%(app_id)s, %(name)s, CASE %(op)s WHEN '-' THEN -%(value)s::bigint ELSE %(value)s::bigint END)
ON CONFLICT (app_id, name) DO UPDATE
SET value = CASE %(op)s WHEN '+' THEN s.value + %(value)s
                        WHEN '-' THEN s.value - %(value)s
                        ELSE %(value)s END,
    updated_at = now();

-- name: set_app_result
UPDATE apps SET result = %(result)s WHERE id = %(app_id)s;

-- name: site_configs
-- What workers elsewhere need to forward data to each site, as the controller wrote it.
SELECT name, config FROM sites;


-- name: worker_module
SELECT module_id FROM workers WHERE id = %(worker_id)s;

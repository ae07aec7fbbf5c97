-- What the controller reads and writes (scalebox_hpc/db/pools.py): demand for
-- workers, worker rows, lease recovery, host fallback, sites, the controller lock.

-- name: module_demand
-- What the controller sizes pools from: ready tasks (counted up to a cap), held ones, what
-- a task takes, and live workers (by their home module).
-- Ready tasks of a HOST-BOUND module that name a to_host need a worker on that host, not
-- just any: host_demand counts those, so they are left out here.
SELECT m.id, m.app_id, m.name, m.site, m.slots, m.min_workers, m.worker_failures,
       (SELECT count(*) FROM (SELECT 1 FROM tasks t WHERE t.module_id = m.id AND t.status = @READY
                                AND (NOT m.host_bound OR t.to_host IS NULL)
                              LIMIT %(ready_cap)s) r) AS ready,
       (SELECT count(*) FROM workers w WHERE w.module_id = m.id
                                        AND w.status IN ('PENDING', 'RUNNING', 'DRAINING')) AS live,
       (SELECT max(w.stopped_at) FROM workers w WHERE w.module_id = m.id AND w.status = 'FAILED') AS last_failure,
       (SELECT count(*) FROM tasks t WHERE t.module_id = m.id AND t.status IN (@QUEUED, @RUNNING)) AS held,
       coalesce((m.definition->>'task_cpus')::integer, 1) AS task_cpus,
       coalesce((m.definition->>'task_gpus')::integer, 0) AS task_gpus,
       m.definition->'host_slots' AS host_slots
FROM modules m JOIN apps a ON a.id = m.app_id
WHERE a.status = 'RUNNING'
ORDER BY m.id;

-- name: create_worker
-- want_host: the host the worker is sent to (HOST-BOUND modules), NULL for anywhere.
INSERT INTO workers (module_id, site, status, lease_expires, want_host)
VALUES (%(module_id)s, %(site)s, 'PENDING', now() + make_interval(secs => %(start_timeout)s), %(want_host)s)
RETURNING id;

-- name: host_demand
-- HOST-BOUND modules of running apps: ready tasks per to_host, with the module's live
-- workers on that host (a pending one counts on the host it was sent to, want_host;
-- 'started' only those already running there) and in all.
WITH ready AS (
    SELECT t.module_id, t.to_host, count(*) AS n
    FROM tasks t JOIN modules m ON m.id = t.module_id JOIN apps a ON a.id = m.app_id
    WHERE m.host_bound AND a.status = 'RUNNING' AND t.status = @READY AND t.to_host IS NOT NULL
    GROUP BY t.module_id, t.to_host
), live AS (
    SELECT w.module_id, coalesce(w.host, w.want_host) AS host, count(*) AS n,
           count(*) FILTER (WHERE w.status <> 'PENDING') AS started
    FROM workers w
    WHERE w.module_id IN (SELECT module_id FROM ready) AND w.status IN ('PENDING', 'RUNNING', 'DRAINING')
    GROUP BY 1, 2
)
SELECT m.id, m.app_id, m.name, m.site, m.slots, coalesce(m.definition->>'host_fallback', 'fail') AS host_fallback,
       r.to_host, r.n AS ready,
       coalesce((SELECT l.n FROM live l WHERE l.module_id = m.id AND l.host = r.to_host), 0) AS there,
       coalesce((SELECT l.started FROM live l WHERE l.module_id = m.id AND l.host = r.to_host), 0) AS started,
       coalesce((SELECT sum(l.n)::bigint FROM live l WHERE l.module_id = m.id), 0) AS live
FROM ready r JOIN modules m ON m.id = r.module_id
ORDER BY m.id, r.to_host;

-- name: fail_host_tasks
-- host_fallback 'fail': the ready tasks waiting for a host that is gone end with a
-- system code, each with an attempt whose note says which host and why.
WITH t AS (
    UPDATE tasks SET status = %(code)s, attempts = attempts + 1, worker_id = NULL, finished_at = now()
    WHERE module_id = %(module_id)s AND to_host = %(host)s AND status = @READY
    RETURNING id, attempts, ready_at
)
INSERT INTO task_exec (task_id, attempt, status_code, t_ready, note)
SELECT id, attempts, %(code)s, ready_at, %(note)s FROM t
RETURNING task_id;

-- name: unpin_host_tasks
-- host_fallback 'anywhere': the ready tasks waiting for a host that is gone may run on
-- any host; the program still sees where they were meant to run (header wanted_host).
UPDATE tasks SET to_host = NULL,
       headers = (headers - 'to_host') || jsonb_build_object('wanted_host', to_host)
WHERE module_id = %(module_id)s AND to_host = %(host)s AND status = @READY
RETURNING id;

-- name: pending_host_workers
-- Worker rows still waiting for their job that were sent to this host for this module.
SELECT id, module_id, status, host, pid, slurm_job_id FROM workers
WHERE module_id = %(module_id)s AND want_host = %(host)s AND status = 'PENDING';

-- name: expire_workers
-- Workers whose lease ran out (killed, node lost, never started) are lost.
UPDATE workers SET status = 'LOST', stopped_at = now(),
       message = CASE status WHEN 'PENDING' THEN 'did not start in time' ELSE 'lease expired: no heartbeat' END
WHERE status IN ('PENDING', 'RUNNING', 'DRAINING') AND lease_expires < now()
RETURNING id, module_id, status;

-- name: orphaned_tasks
-- Tasks still held by a worker that is gone.
SELECT t.id, t.attempts, t.module_id, t.worker_id, t.ready_at, t.claimed_at,
       m.definition->'retry_rules' AS retry_rules,
       (SELECT count(*) FROM task_exec e WHERE e.task_id = t.id AND e.status_code = @LEASE_LOST) AS lost_before
FROM tasks t JOIN workers w ON w.id = t.worker_id JOIN modules m ON m.id = t.module_id
WHERE t.status IN (@QUEUED, @RUNNING) AND w.status IN ('LOST', 'EXITED', 'FAILED')
ORDER BY t.id
LIMIT 5000
FOR UPDATE OF t SKIP LOCKED;

-- name: finish_apps
-- An app whose tasks are all final is FINISHED.
UPDATE apps a SET status = 'FINISHED', finished_at = now()
WHERE a.status = 'RUNNING'
  AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.app_id = a.id AND t.status IN (@INITIAL, @READY, @QUEUED, @RUNNING))
RETURNING a.id;

-- name: last_worker_failure
SELECT message FROM workers WHERE module_id = %(module_id)s AND status IN ('FAILED', 'LOST')
ORDER BY stopped_at DESC NULLS LAST LIMIT 1;

-- name: upsert_site
INSERT INTO sites (name, kind, config) VALUES (%(name)s, %(kind)s, %(config)s)
ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, config = EXCLUDED.config, updated_at = now();

-- name: list_sites
SELECT name, kind, status, status_reason AS reason, updated_at FROM sites ORDER BY name;

-- name: live_workers
SELECT w.id, w.module_id, w.status, w.host, w.pid, w.slurm_job_id
FROM workers w WHERE w.site = %(site)s AND w.status IN ('PENDING', 'RUNNING', 'DRAINING');

-- name: mark_workers_lost
UPDATE workers SET status = 'LOST', stopped_at = now(), message = %(message)s
WHERE id = ANY(%(worker_ids)s) AND status IN ('PENDING', 'RUNNING', 'DRAINING');

-- name: try_controller_lock
-- One active controller per database; others stand by (a session lock: it goes
-- with the controller's connection, so a killed controller frees it at once).
SELECT pg_try_advisory_lock(726002);

-- name: release_controller_lock
SELECT pg_advisory_unlock(726002);

-- name: recover_tasks
UPDATE tasks t SET status = x.s, worker_id = NULL,
       ready_at = CASE WHEN x.s = @READY THEN now() ELSE t.ready_at END,
       finished_at = CASE WHEN x.s = @READY THEN NULL ELSE now() END
FROM unnest(%(task_ids)s::bigint[], %(statuses)s::integer[]) AS x(id, s)
WHERE t.id = x.id;

-- name: set_worker_job
UPDATE workers SET slurm_job_id = %(slurm_job_id)s WHERE id = %(worker_id)s;

-- name: stop_workers
UPDATE workers SET status = %(status)s, message = %(message)s, stopped_at = now()
WHERE id = ANY(%(worker_ids)s) AND status IN ('PENDING', 'RUNNING', 'DRAINING');

-- name: stale_pending_workers
-- Worker rows still waiting for their job while their app is no longer running.
SELECT w.site, w.id, w.module_id, w.status, w.host, w.pid, w.slurm_job_id
FROM workers w JOIN modules m ON m.id = w.module_id JOIN apps a ON a.id = m.app_id
WHERE w.status = 'PENDING' AND a.status <> 'RUNNING';

-- name: set_site_status
UPDATE sites SET status = %(status)s, status_reason = %(reason)s, updated_at = now() WHERE name = %(name)s;

-- name: probe_report
-- 'scalebox-hpc site probe', run in a job on a compute node, reports to 'site check',
-- which LISTENs on the channel (made from a random hex token).
SELECT pg_notify(%(channel)s, %(payload)s);

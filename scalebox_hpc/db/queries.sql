-- Every SQL statement the project runs, by name. scalebox_hpc/db/store.py turns
-- them into Python calls; nothing else in the package writes SQL.
-- Placeholders are psycopg named parameters; a name after @ (@READY, @LEASE_LOST) is a
-- task status or code of scalebox_hpc/states.py, put in as a number when loaded.

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

-- name: create_app
INSERT INTO apps (name, status, site, definition, started_at)
VALUES (%(name)s, %(status)s, %(site)s, %(definition)s, CASE WHEN %(status)s = 'RUNNING' THEN now() END)
RETURNING id;

-- name: create_module
INSERT INTO modules (app_id, name, site, definition, host_bound, slots, min_workers)
VALUES (%(app_id)s, %(name)s, %(site)s, %(definition)s, %(host_bound)s, %(slots)s, %(min_workers)s)
RETURNING id;

-- name: insert_tasks
-- Dedup: a message whose (module, body) was seen before is skipped unless repeatable
-- (the caller removes duplicates within one batch). New READY tasks wake the idle
-- workers of their module, one notify per module.
WITH x AS (
    SELECT *, md5(b)::uuid AS k
    FROM unnest(%(module_ids)s::bigint[], %(bodies)s::text[], %(headers)s::text[],
                %(repeatable)s::boolean[], %(to_hosts)s::text[], %(from_tasks)s::bigint[],
                %(created)s::timestamptz[]) AS x(m, b, h, r, th, ft, mc)
), fresh AS (
    INSERT INTO task_keys (module_id, body_md5)
    SELECT m, k FROM x WHERE NOT r
    ON CONFLICT DO NOTHING
    RETURNING module_id, body_md5
), ins AS (
    INSERT INTO tasks (app_id, module_id, body, headers, repeatable, to_host, from_task_id,
                       message_created, ready_at, status)
    SELECT %(app_id)s, x.m, x.b, x.h::jsonb, x.r, x.th, x.ft, coalesce(x.mc, now()), now(), @READY
    FROM x
    WHERE x.r OR EXISTS (SELECT 1 FROM fresh f WHERE f.module_id = x.m AND f.body_md5 = x.k)
    RETURNING module_id
)
SELECT module_id, count(*), pg_notify('sbx_m' || module_id, 'ready') FROM ins GROUP BY module_id;

-- name: copy_task_keys
COPY task_keys (module_id, body_md5) FROM STDIN;

-- name: copy_tasks
-- The start tasks of a new app: nothing older to dedup against, so a plain COPY.
COPY tasks (app_id, module_id, body, headers, repeatable, to_host) FROM STDIN;

-- name: copy_task_exec
COPY task_exec (task_id, attempt, status_code, worker_id, t_ready, t_claimed, t_received,
                t_check_start, t_check_end, t_stagein_start, t_stagein_end,
                t_program_start, t_program_end, t_stageout_start, t_stageout_end,
                t_forward_start, t_forward_end, user_timestamps, stdout, stderr, user_text,
                auxout, input_bytes, output_bytes, input_files, output_files, messages_out, note,
                forward_bytes, forward_files, forwards)
FROM STDIN;

-- name: reopen_app
UPDATE apps SET status = 'RUNNING', finished_at = NULL
WHERE id = %(app_id)s AND status = 'FINISHED';

-- name: get_app
SELECT id, name, status, site, definition, result, message, created_at, started_at, finished_at
FROM apps WHERE id = %(app_id)s;

-- name: list_apps
SELECT id, name, status, site, result, created_at, started_at, finished_at
FROM apps ORDER BY id DESC LIMIT %(limit)s;

-- name: set_app_status
-- Moves an app between states; only the listed current states may change.
UPDATE apps SET status = %(status)s, message = coalesce(%(message)s, message),
       started_at = CASE WHEN %(status)s = 'RUNNING' THEN coalesce(started_at, now()) ELSE started_at END,
       finished_at = CASE WHEN %(status)s IN ('FINISHED', 'FAILED', 'CANCELLED') THEN now() END
WHERE id = %(app_id)s AND status = ANY(%(from_states)s)
RETURNING id;

-- name: notify_app_modules
SELECT pg_notify('sbx_m' || id, %(payload)s) FROM modules WHERE app_id = %(app_id)s;

-- name: app_modules
SELECT id, name, site, definition, host_bound, slots, min_workers
FROM modules WHERE app_id = %(app_id)s ORDER BY id;

-- name: get_module
SELECT m.id, m.app_id, m.name, m.site, m.definition, m.host_bound, m.slots, a.definition AS app_definition
FROM modules m JOIN apps a ON a.id = m.app_id WHERE m.id = %(module_id)s;

-- name: module_by_name
SELECT id FROM modules WHERE app_id = %(app_id)s AND name = %(name)s;

-- name: module_demand
-- What the controller sizes pools from: ready tasks (counted up to a cap) and live workers.
-- Ready tasks of a HOST-BOUND module that name a to_host need a worker on that host, not
-- just any: host_demand counts those, so they are left out here.
SELECT m.id, m.app_id, m.name, m.site, m.slots, m.min_workers, m.worker_failures,
       (SELECT count(*) FROM (SELECT 1 FROM tasks t WHERE t.module_id = m.id AND t.status = @READY
                                AND (NOT m.host_bound OR t.to_host IS NULL)
                              LIMIT %(ready_cap)s) r) AS ready,
       (SELECT count(*) FROM workers w WHERE w.module_id = m.id
                                        AND w.status IN ('PENDING', 'RUNNING', 'DRAINING')) AS live,
       (SELECT max(w.stopped_at) FROM workers w WHERE w.module_id = m.id AND w.status = 'FAILED') AS last_failure
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
SELECT m.id, m.app_id, m.name, m.site, m.slots, coalesce(m.definition->>'host_fallback', 'fail'),
       r.to_host, r.n,
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
SELECT id, slurm_job_id FROM workers
WHERE module_id = %(module_id)s AND want_host = %(host)s AND status = 'PENDING';

-- name: start_worker
UPDATE workers SET status = 'RUNNING', host = %(host)s, ip = %(ip)s, pid = %(pid)s,
       slurm_job_id = %(slurm_job_id)s, started_at = now(), heartbeat_at = now(),
       lease_expires = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = %(worker_id)s AND status = 'PENDING'
RETURNING module_id;

-- name: heartbeat
-- Renews the lease on all of a worker's tasks at once (the lease lives on the worker).
-- No row back means the controller declared this worker lost: it must stop at once.
UPDATE workers w SET lease_expires = now() + make_interval(secs => %(lease_seconds)s), heartbeat_at = now()
FROM modules m JOIN apps a ON a.id = m.app_id
WHERE w.id = %(worker_id)s AND w.status IN ('RUNNING', 'DRAINING') AND m.id = w.module_id
RETURNING a.status;

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
    WHERE t.module_id = %(module_id)s AND t.status = @READY
      AND (NOT %(host_bound)s OR t.to_host IS NULL OR t.to_host = %(host)s)
      AND EXISTS (SELECT 1 FROM apps a WHERE a.id = %(app_id)s AND a.status = 'RUNNING')
      AND EXISTS (SELECT 1 FROM workers w WHERE w.id = %(worker_id)s AND w.status = 'RUNNING')
    ORDER BY t.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t SET status = @QUEUED, worker_id = %(worker_id)s, attempts = t.attempts + 1, claimed_at = now()
FROM c WHERE t.id = c.id
RETURNING t.id, t.body, t.headers::text, t.attempts, t.ready_at, t.claimed_at;

-- name: mark_running
UPDATE tasks SET status = @RUNNING
WHERE id = %(task_id)s AND worker_id = %(worker_id)s AND status = @QUEUED;

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
UPDATE tasks t
SET status = x.status,
    worker_id = CASE WHEN x.status = @READY THEN NULL ELSE t.worker_id END,
    ready_at = CASE WHEN x.status = @READY THEN now() ELSE t.ready_at END,
    finished_at = CASE WHEN x.status = @READY THEN NULL ELSE now() END
FROM unnest(%(task_ids)s::bigint[], %(attempts)s::integer[], %(statuses)s::integer[]) AS x(id, attempt, status)
WHERE t.id = x.id AND t.worker_id = %(worker_id)s AND t.status IN (@QUEUED, @RUNNING) AND t.attempts = x.attempt
RETURNING t.id, t.status;

-- name: notify_module
SELECT pg_notify('sbx_m' || %(module_id)s, %(payload)s);

-- name: count_done
-- A worker that got work done ends its module's run of failed workers.
WITH w AS (UPDATE workers SET tasks_done = tasks_done + %(n)s WHERE id = %(worker_id)s RETURNING module_id)
UPDATE modules m SET worker_failures = 0 FROM w WHERE m.id = w.module_id AND m.worker_failures <> 0;

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

-- name: list_semaphores
SELECT name, value, updated_at FROM semaphores WHERE app_id = %(app_id)s ORDER BY name;

-- name: get_semaphore
SELECT value FROM semaphores WHERE app_id = %(app_id)s AND name = %(name)s;

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

-- name: fail_app_for_workers
UPDATE apps SET status = 'FAILED', finished_at = now(), message = %(message)s
WHERE id = %(app_id)s AND status = 'RUNNING';

-- name: last_worker_failure
SELECT message FROM workers WHERE module_id = %(module_id)s AND status IN ('FAILED', 'LOST')
ORDER BY stopped_at DESC NULLS LAST LIMIT 1;

-- name: list_tasks
SELECT t.id, m.name AS module, t.status, t.attempts, t.body, t.headers, t.to_host,
       w.host, t.inserted_at, t.finished_at
FROM tasks t JOIN modules m ON m.id = t.module_id LEFT JOIN workers w ON w.id = t.worker_id
WHERE t.app_id = %(app_id)s
  AND (%(module)s::text IS NULL OR m.name = %(module)s)
  AND (%(status)s::integer IS NULL OR t.status = %(status)s)
ORDER BY t.id
LIMIT %(limit)s;

-- name: get_task
SELECT t.id, t.app_id, m.name AS module, t.status, t.attempts, t.body, t.headers, t.to_host,
       t.repeatable, t.from_task_id, t.message_created, t.inserted_at, t.ready_at, t.claimed_at, t.finished_at
FROM tasks t JOIN modules m ON m.id = t.module_id WHERE t.id = %(task_id)s;

-- name: task_execs
-- Every attempt with its full record: the worker's place and the task's own times joined in.
SELECT e.attempt, e.status_code, e.worker_id, w.site, w.host, w.ip, w.slurm_job_id,
       t.message_created AS t_message_created, t.inserted_at AS t_inserted,
       e.t_ready, e.t_claimed, e.t_received, e.t_check_start, e.t_check_end,
       e.t_stagein_start, e.t_stagein_end, e.t_program_start, e.t_program_end,
       e.t_stageout_start, e.t_stageout_end, e.t_sink_committed, e.t_completed,
       e.t_forward_start, e.t_forward_end, e.user_timestamps, e.stdout, e.stderr, e.user_text,
       e.auxout, e.input_bytes, e.output_bytes, e.input_files, e.output_files, e.messages_out, e.note,
       e.forward_bytes, e.forward_files, e.forwards
FROM task_exec e JOIN tasks t ON t.id = e.task_id LEFT JOIN workers w ON w.id = e.worker_id
WHERE e.task_id = %(task_id)s ORDER BY e.attempt;

-- name: retry_tasks
-- Operator retry: final failed tasks (an exit code, or a system code -100 and below)
-- become READY again, each filter applying when given. One more attempt each: the
-- retry rules still count the attempts they had.
UPDATE tasks SET status = @READY, ready_at = now(), finished_at = NULL, worker_id = NULL
WHERE app_id = %(app_id)s AND (status > @OK OR status < @INITIAL)
  AND (%(task_ids)s::bigint[] IS NULL OR id = ANY(%(task_ids)s::bigint[]))
  AND (%(module_id)s::bigint IS NULL OR module_id = %(module_id)s)
  AND (%(codes)s::integer[] IS NULL OR status = ANY(%(codes)s::integer[]))
RETURNING id, module_id;

-- name: list_workers
SELECT w.id, m.name AS module, w.site, w.status, w.host, w.pid, w.slurm_job_id, w.tasks_done,
       w.started_at, w.heartbeat_at, w.stopped_at, w.message
FROM workers w JOIN modules m ON m.id = w.module_id
WHERE m.app_id = %(app_id)s ORDER BY w.id;

-- name: upsert_site
INSERT INTO sites (name, kind, config) VALUES (%(name)s, %(kind)s, %(config)s)
ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, config = EXCLUDED.config, updated_at = now();

-- name: site_configs
SELECT name, config FROM sites;

-- name: list_sites
SELECT name, kind, status, status_reason, updated_at FROM sites ORDER BY name;

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

-- name: worker_module
SELECT module_id FROM workers WHERE id = %(worker_id)s;

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
SELECT w.id, w.site, w.slurm_job_id
FROM workers w JOIN modules m ON m.id = w.module_id JOIN apps a ON a.id = m.app_id
WHERE w.status = 'PENDING' AND a.status <> 'RUNNING';

-- name: set_site_status
UPDATE sites SET status = %(status)s, status_reason = %(reason)s, updated_at = now() WHERE name = %(name)s;

-- name: probe_report
-- 'scalebox-hpc site probe', run in a job on a compute node, reports to 'site check'.
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: probe_listen
-- The channel is made by 'site check' from a random hex token: safe to splice in.
LISTEN {channel};

-- name: module_status
-- Per module and task status, for 'app show' / 'app watch' / progress: how many, how
-- many finished in the last `window` seconds, and when the module's work began.
SELECT m.name, t.status, count(t.id),
       count(*) FILTER (WHERE t.finished_at > now() - make_interval(secs => %(window)s)),
       min(t.claimed_at), now()
FROM modules m LEFT JOIN tasks t ON t.module_id = m.id
WHERE m.app_id = %(app_id)s
GROUP BY m.id, m.name, t.status
ORDER BY m.id, t.status;

-- name: app_worker_counts
-- The app's live workers: queued (job not started) and started.
SELECT count(*) FILTER (WHERE w.status = 'PENDING'),
       count(*) FILTER (WHERE w.status IN ('RUNNING', 'DRAINING'))
FROM workers w JOIN modules m ON m.id = w.module_id
WHERE m.app_id = %(app_id)s AND w.status IN ('PENDING', 'RUNNING', 'DRAINING');

-- Report (scalebox_hpc/report.py). The app's attempts are copied once, narrowed to the
-- columns the report aggregates, into a temporary table that its transaction drops;
-- every figure is then one aggregate over it, so a run of a million tasks is read once.

-- name: report_snapshot
-- Every figure of a report from one snapshot: they agree even while the app runs.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ;

-- name: report_session
SET LOCAL work_mem = '64MB';

-- name: report_exec_table
-- The stage durations of report.STAGES: ready -> claimed (queue wait), claimed ->
-- received (held in the worker's claimed batch), check hook, stage-in, program,
-- stage-out, stage-out end -> completion committed (batched), cross-site forward.
-- Times in epoch seconds; t_start .. t_end is the attempt's time on its worker.
CREATE TEMP TABLE report_exec ON COMMIT DROP AS
SELECT e.task_id, e.attempt, e.status_code AS code, e.worker_id, t.module_id,
       t.status AS final_status, t.attempts AS task_attempts,
       date_part('epoch', coalesce(e.t_received, e.t_claimed)) AS t_start,
       date_part('epoch', coalesce(e.t_stageout_end, e.t_completed)) AS t_end,
       date_part('epoch', e.t_claimed - e.t_ready) AS queue_wait,
       date_part('epoch', e.t_received - e.t_claimed) AS batch_wait,
       date_part('epoch', e.t_check_end - e.t_check_start) AS check_hook,
       date_part('epoch', e.t_stagein_end - e.t_stagein_start) AS stage_in,
       date_part('epoch', e.t_program_end - e.t_program_start) AS run,
       date_part('epoch', e.t_stageout_end - e.t_stageout_start) AS stage_out,
       date_part('epoch', e.t_completed - e.t_stageout_end) AS committing,
       date_part('epoch', e.t_forward_end - e.t_forward_start) AS forward
FROM task_exec e JOIN tasks t ON t.id = e.task_id
WHERE t.app_id = %(app_id)s;

-- name: report_analyze
ANALYZE report_exec;

-- name: report_span
SELECT min(t_start), max(greatest(t_end, t_start)) FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL;

-- name: report_module_attempts
SELECT module_id, count(*), count(*) FILTER (WHERE attempt > 1), count(*) FILTER (WHERE code <> @OK),
       count(*) FILTER (WHERE code = @LEASE_LOST), coalesce(sum(run), 0),
       coalesce(sum(greatest(t_end - t_start, 0)), 0)
FROM report_exec GROUP BY module_id;

-- name: report_stage_buckets
-- One stage's durations ({stage}: a report_exec column, spliced in as an identifier) per
-- module in buckets of 1/200 of a decade from 1 us to 10^7 s, with count, sum, min and max
-- of each: exact counts, totals and extremes, and percentiles within 0.6 percent. Sorting
-- every duration instead takes several times longer; one query per stage is faster than
-- one that unpivots them all.
SELECT module_id, width_bucket(log(greatest({stage}, 1e-6::float8)), -6, 7, 2600),
       count(*), sum({stage}), min({stage}), max({stage})
FROM report_exec WHERE {stage} IS NOT NULL
GROUP BY 1, 2;

-- name: report_time_bins
-- Attempts starting and ending in each of the time bins (width seconds from t0), per module
-- and per worker. With the time left in the bin after each start and each end, the caller
-- gets the exact mean number of attempts running in every bin without splitting any.
WITH ev AS (
    SELECT module_id, worker_id, t_start AS t, true AS is_start, NULL::boolean AS ok
    FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL
    UNION ALL
    SELECT module_id, worker_id, greatest(t_end, t_start), false, code = @OK
    FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL
), b AS (
    SELECT *, least(greatest(floor((t - %(t0)s) / %(width)s), 0), %(bins)s - 1)::integer AS bin FROM ev
)
SELECT GROUPING(worker_id) = 1 AS per_module, module_id, worker_id, bin,
       count(*) FILTER (WHERE is_start), count(*) FILTER (WHERE NOT is_start), count(*) FILTER (WHERE ok),
       coalesce(sum(%(t0)s + (bin + 1) * %(width)s - t) FILTER (WHERE is_start), 0),
       coalesce(sum(%(t0)s + (bin + 1) * %(width)s - t) FILTER (WHERE NOT is_start), 0)
FROM b
GROUP BY GROUPING SETS ((module_id, bin), (worker_id, bin));

-- name: report_workers
WITH a AS (
    SELECT worker_id, count(*) AS attempts, sum(greatest(t_end - t_start, 0)) AS busy
    FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL AND worker_id IS NOT NULL
    GROUP BY worker_id
)
SELECT a.worker_id, w.module_id, w.host, w.site, w.slurm_job_id, w.status, a.attempts, a.busy
FROM a JOIN workers w ON w.id = a.worker_id
ORDER BY w.module_id, w.id;

-- name: report_gantt_bars
-- The Gantt's bars: the per_worker longest successful and longest failed attempts of each shown worker.
SELECT task_id, attempt, worker_id, code, t_start, greatest(t_end, t_start), run
FROM (SELECT r.*, row_number() OVER (PARTITION BY worker_id, code = @OK ORDER BY t_end - t_start DESC) AS k
      FROM report_exec r
      WHERE worker_id = ANY(%(worker_ids)s) AND t_start IS NOT NULL AND t_end IS NOT NULL) x
WHERE k <= %(per_worker)s;

-- name: report_exit_codes
-- Attempts per module and exit code, and how many of them left their task in that final state.
SELECT module_id, code, count(*), count(*) FILTER (WHERE attempt = task_attempts AND final_status = code)
FROM report_exec GROUP BY module_id, code ORDER BY module_id, code;

-- name: report_slowest
SELECT r.task_id, r.attempt, r.module_id, r.code, w.host, r.worker_id, r.run, r.queue_wait,
       greatest(r.t_end - r.t_start, 0), left(t.body, 80)
FROM (SELECT * FROM report_exec WHERE run IS NOT NULL ORDER BY run DESC LIMIT %(limit)s) r
JOIN tasks t ON t.id = r.task_id LEFT JOIN workers w ON w.id = r.worker_id
ORDER BY r.run DESC;

-- name: find_tasks
-- 'task list': each filter applies when given; failed = any final failure code; host =
-- where the task's last attempt ran.
SELECT t.id, m.name AS module, t.status, t.attempts, t.body, t.headers, t.to_host,
       w.host, t.inserted_at, t.finished_at
FROM tasks t JOIN modules m ON m.id = t.module_id LEFT JOIN workers w ON w.id = t.worker_id
WHERE t.app_id = %(app_id)s
  AND (%(module)s::text IS NULL OR m.name = %(module)s)
  AND (%(status)s::integer IS NULL OR t.status = %(status)s)
  AND (NOT %(failed)s OR t.status > @OK OR t.status < @INITIAL)
  AND (%(host)s::text IS NULL OR w.host = %(host)s)
ORDER BY t.id
LIMIT %(limit)s;

-- The writes to tasks and task_exec that the queue, apps and pools share
-- (scalebox_hpc/db/tasks.py).

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

-- name: analyze_sample
-- The planner needs the queue's size and the share of each state, not fine histograms:
-- a sample of 3,000 rows instead of 30,000 makes the ANALYZE below ten times cheaper.
SET LOCAL default_statistics_target = 10;

-- name: analyze_tasks
-- After a bulk load: the planner's statistics of the queue describe what is in it now.
ANALYZE tasks, task_keys;

-- name: copy_task_exec
COPY task_exec (task_id, attempt, status_code, worker_id, t_ready, t_claimed, t_received,
                t_check_start, t_check_end, t_stagein_start, t_stagein_end,
                t_program_start, t_program_end, t_stageout_start, t_stageout_end,
                t_forward_start, t_forward_end, user_timestamps, stdout, stderr, user_text,
                auxout, input_bytes, output_bytes, input_files, output_files, messages_out, note,
                forward_bytes, forward_files, forwards, slot, cpus, gpus, extras)
FROM STDIN;

-- name: notify_module
SELECT pg_notify('sbx_m' || %(module_id)s, %(payload)s);

-- name: notify_app
-- Whoever follows the app ('scalebox-hpc run') looks at it now rather than at its next poll.
SELECT pg_notify('sbx_a' || %(app_id)s, %(payload)s);

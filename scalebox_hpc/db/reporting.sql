-- What 'app show', 'app watch', 'task show', 'task list' and the report read
-- (scalebox_hpc/db/reporting.py).

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
       e.forward_bytes, e.forward_files, e.forwards, e.extras
FROM task_exec e JOIN tasks t ON t.id = e.task_id LEFT JOIN workers w ON w.id = e.worker_id
WHERE e.task_id = %(task_id)s ORDER BY e.attempt;

-- name: list_workers
SELECT w.id, m.name AS module, w.site, w.status, w.host, w.pid, w.slurm_job_id, w.tasks_done,
       w.started_at, w.heartbeat_at, w.stopped_at, w.message
FROM workers w JOIN modules m ON m.id = w.module_id
WHERE m.app_id = %(app_id)s ORDER BY w.id;

-- name: module_status
-- Per module and task status, for 'app show' / 'app watch' / progress: how many, how
-- many finished in the last `window` seconds, and when the module's work began.
SELECT m.name AS module, t.status, count(t.id) AS n,
       count(*) FILTER (WHERE t.finished_at > now() - make_interval(secs => %(window)s)) AS done_recently,
       min(t.claimed_at) AS first_claimed, now() AS now
FROM modules m LEFT JOIN tasks t ON t.module_id = m.id
WHERE m.app_id = %(app_id)s
GROUP BY m.id, m.name, t.status
ORDER BY m.id, t.status;

-- name: app_worker_counts
-- The app's live workers: queued (job not started) and started.
SELECT count(*) FILTER (WHERE w.status = 'PENDING') AS pending,
       count(*) FILTER (WHERE w.status IN ('RUNNING', 'DRAINING')) AS started
FROM workers w JOIN modules m ON m.id = w.module_id
WHERE m.app_id = %(app_id)s AND w.status IN ('PENDING', 'RUNNING', 'DRAINING');

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
SELECT min(t_start) AS t0, max(greatest(t_end, t_start)) AS t1 FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL;

-- name: report_module_attempts
SELECT module_id, count(*) AS attempts, count(*) FILTER (WHERE attempt > 1) AS retries,
       count(*) FILTER (WHERE code <> @OK) AS failed_attempts, count(*) FILTER (WHERE code = @LEASE_LOST) AS lost,
       coalesce(sum(run), 0) AS run_seconds, coalesce(sum(greatest(t_end - t_start, 0)), 0) AS busy_seconds
FROM report_exec GROUP BY module_id;

-- name: report_stage_buckets
-- One stage's durations ({stage}: a report_exec column, spliced in as an identifier) per
-- module in buckets of 1/200 of a decade from 1 us to 10^7 s, with count, sum, min and max
-- of each: exact counts, totals and extremes, and percentiles within 0.6 percent. Sorting
-- every duration instead takes several times longer; one query per stage is faster than
-- one that unpivots them all.
SELECT module_id, width_bucket(log(greatest({stage}, 1e-6::float8)), -6, 7, 2600) AS bucket,
       count(*) AS n, sum({stage}) AS total, min({stage}) AS low, max({stage}) AS high
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
       count(*) FILTER (WHERE is_start) AS starts, count(*) FILTER (WHERE NOT is_start) AS ends,
       count(*) FILTER (WHERE ok) AS ok,
       coalesce(sum(%(t0)s + (bin + 1) * %(width)s - t) FILTER (WHERE is_start), 0) AS start_rest,
       coalesce(sum(%(t0)s + (bin + 1) * %(width)s - t) FILTER (WHERE NOT is_start), 0) AS end_rest
FROM b
GROUP BY GROUPING SETS ((module_id, bin), (worker_id, bin));

-- name: report_workers
WITH a AS (
    SELECT worker_id, count(*) AS attempts, sum(greatest(t_end - t_start, 0)) AS busy
    FROM report_exec WHERE t_start IS NOT NULL AND t_end IS NOT NULL AND worker_id IS NOT NULL
    GROUP BY worker_id
)
SELECT a.worker_id AS id, w.module_id, w.host, w.site, w.slurm_job_id, w.status, a.attempts,
       a.busy AS busy_seconds
FROM a JOIN workers w ON w.id = a.worker_id
ORDER BY w.module_id, w.id;

-- name: report_gantt_bars
-- The Gantt's bars: the per_worker longest successful and longest failed attempts of each shown worker.
SELECT task_id, attempt, worker_id, code, t_start AS start, greatest(t_end, t_start) AS "end", run
FROM (SELECT r.*, row_number() OVER (PARTITION BY worker_id, code = @OK ORDER BY t_end - t_start DESC) AS k
      FROM report_exec r
      WHERE worker_id = ANY(%(worker_ids)s) AND t_start IS NOT NULL AND t_end IS NOT NULL) x
WHERE k <= %(per_worker)s;

-- name: report_exit_codes
-- Attempts per module and exit code, and how many of them left their task in that final state.
SELECT module_id, code, count(*) AS attempts,
       count(*) FILTER (WHERE attempt = task_attempts AND final_status = code) AS final
FROM report_exec GROUP BY module_id, code ORDER BY module_id, code;

-- name: report_slowest
SELECT r.task_id, r.attempt, r.module_id, r.code, w.host, r.worker_id, r.run, r.queue_wait,
       greatest(r.t_end - r.t_start, 0) AS busy, left(t.body, 80) AS body
FROM (SELECT * FROM report_exec WHERE run IS NOT NULL ORDER BY run DESC LIMIT %(limit)s) r
JOIN tasks t ON t.id = r.task_id LEFT JOIN workers w ON w.id = r.worker_id
ORDER BY r.run DESC;

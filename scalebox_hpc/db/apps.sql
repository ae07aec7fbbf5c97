-- Apps, their modules, tasks added or retried by hand, semaphores
-- (scalebox_hpc/db/apps.py).

-- name: create_app
INSERT INTO apps (name, status, site, definition, started_at)
VALUES (%(name)s, %(status)s, %(site)s, %(definition)s, CASE WHEN %(status)s = 'RUNNING' THEN now() END)
RETURNING id;

-- name: create_module
INSERT INTO modules (app_id, name, site, definition, host_bound, slots, min_workers)
VALUES (%(app_id)s, %(name)s, %(site)s, %(definition)s, %(host_bound)s, %(slots)s, %(min_workers)s)
RETURNING id;

-- name: reopen_app
UPDATE apps SET status = 'RUNNING', finished_at = NULL
WHERE id = %(app_id)s AND status = 'FINISHED';

-- name: get_app
SELECT id, name, status, site, result, message, created_at, started_at, finished_at
FROM apps WHERE id = %(app_id)s;

-- name: list_apps
SELECT id, name, status, site, result, message, created_at, started_at, finished_at
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

-- name: notify_app_sites
-- A new app: the running pilots of its sites take its modules up (channel sbx_sites,
-- payload the site's name).
SELECT pg_notify('sbx_sites', site) FROM (SELECT DISTINCT site FROM modules WHERE app_id = %(app_id)s) s;

-- name: app_modules
SELECT id, name, site, host_bound, slots, min_workers
FROM modules WHERE app_id = %(app_id)s ORDER BY id;

-- name: module_by_name
SELECT id FROM modules WHERE app_id = %(app_id)s AND name = %(name)s;

-- name: list_semaphores
SELECT name, value, updated_at FROM semaphores WHERE app_id = %(app_id)s ORDER BY name;

-- name: get_semaphore
SELECT value FROM semaphores WHERE app_id = %(app_id)s AND name = %(name)s;

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

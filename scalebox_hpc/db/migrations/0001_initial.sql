-- Initial schema. Status codes follow upstream Scalebox (defined in scalebox_hpc/states.py):
-- -9 INITIAL, -1 READY, -2 QUEUED (claimed), -3 RUNNING, 0 OK, >0 exit code.

CREATE TABLE sites (
    name            text PRIMARY KEY,
    kind            text NOT NULL,
    status          text NOT NULL DEFAULT 'OK',          -- OK | DEGRADED
    status_reason   text,
    config          jsonb NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE apps (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL,
    status          text NOT NULL DEFAULT 'INITIAL',
    site            text NOT NULL DEFAULT 'local',
    definition      jsonb NOT NULL,
    result          text,
    message         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    CONSTRAINT apps_status CHECK (status IN ('INITIAL','RUNNING','PAUSED','FINISHED','FAILED','CANCELLED'))
);
CREATE INDEX apps_active ON apps (status) WHERE status IN ('INITIAL','RUNNING','PAUSED');

CREATE TABLE modules (
    id              bigserial PRIMARY KEY,
    app_id          bigint NOT NULL REFERENCES apps ON DELETE CASCADE,
    name            text NOT NULL,
    site            text NOT NULL,
    definition      jsonb NOT NULL,
    host_bound      boolean NOT NULL DEFAULT false,
    slots           integer NOT NULL DEFAULT 1,
    min_workers     integer NOT NULL DEFAULT 0,
    worker_failures integer NOT NULL DEFAULT 0,          -- consecutive workers that failed to start
    UNIQUE (app_id, name)
);

CREATE TABLE workers (
    id              bigserial PRIMARY KEY,
    module_id       bigint NOT NULL REFERENCES modules ON DELETE CASCADE,
    site            text NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING',      -- PENDING | RUNNING | DRAINING | EXITED | LOST | FAILED
    host            text,
    ip              text,
    pid             integer,
    slurm_job_id    text,
    lease_expires   timestamptz NOT NULL,
    tasks_done      bigint NOT NULL DEFAULT 0,
    message         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    heartbeat_at    timestamptz,
    stopped_at      timestamptz
);
CREATE INDEX workers_live ON workers (module_id) WHERE status IN ('PENDING','RUNNING','DRAINING');

-- tasks, task_keys and task_exec take a row per message and per attempt, millions
-- per run: they carry no foreign keys (a trigger per row on the hot path). Their
-- references are written only by scalebox_hpc/db/, inside the transactions that make them.
CREATE TABLE tasks (
    id              bigserial PRIMARY KEY,
    app_id          bigint NOT NULL,
    module_id       bigint NOT NULL,
    body            text NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    repeatable      boolean NOT NULL DEFAULT false,
    to_host         text,
    status          integer NOT NULL DEFAULT -1,
    attempts        integer NOT NULL DEFAULT 0,
    worker_id       bigint,
    from_task_id    bigint,
    message_created timestamptz DEFAULT now(),
    inserted_at     timestamptz NOT NULL DEFAULT now(),
    ready_at        timestamptz DEFAULT now(),
    claimed_at      timestamptz,
    finished_at     timestamptz
);
-- Task rows are updated twice in their life (claimed, completed) and each update
-- writes an entry into every index whose predicate matches: keep them few and partial.
-- The claim query walks this partial index only.
CREATE INDEX tasks_ready ON tasks (module_id, id) WHERE status = -1;
-- Lease recovery: tasks held by a worker.
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status IN (-2, -3);
-- App completion checks only the unfinished tasks of an app.
CREATE INDEX tasks_active ON tasks (app_id) WHERE status IN (-9, -1, -2, -3);

-- Dedup: a (module, body) pair runs once per app unless the message says repeatable.
-- Kept apart from tasks so that the md5 key is written once, not on every task update.
CREATE TABLE task_keys (
    module_id       bigint NOT NULL,
    body_md5        uuid NOT NULL,
    PRIMARY KEY (module_id, body_md5)
);

CREATE TABLE task_exec (
    task_id         bigint NOT NULL,
    attempt         integer NOT NULL,
    status_code     integer NOT NULL,
    -- Site, host, address and Slurm job are the worker's (workers row); message
    -- creation and insertion times are the task's (tasks row): not repeated per attempt.
    worker_id       bigint,
    -- the task perspective: when each stage of this attempt began and ended
    t_ready             timestamptz,
    t_claimed           timestamptz,
    t_received          timestamptz,
    t_check_start       timestamptz,
    t_check_end         timestamptz,
    t_stagein_start     timestamptz,
    t_stagein_end       timestamptz,
    t_program_start     timestamptz,
    t_program_end       timestamptz,
    t_stageout_start    timestamptz,
    t_stageout_end      timestamptz,
    t_sink_committed    timestamptz DEFAULT now(),   -- the completing transaction's time
    t_completed         timestamptz DEFAULT now(),
    t_forward_start     timestamptz,
    t_forward_end       timestamptz,
    user_timestamps jsonb,
    stdout          text,
    stderr          text,
    user_text       text,
    auxout          text,
    input_bytes     bigint,
    output_bytes    bigint,
    input_files     jsonb,
    output_files    jsonb,
    messages_out    integer NOT NULL DEFAULT 0,
    note            text,
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE semaphores (
    app_id          bigint NOT NULL REFERENCES apps ON DELETE CASCADE,
    name            text NOT NULL,
    value           bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, name)
);

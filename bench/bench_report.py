#!/usr/bin/env python3
"""How long 'scalebox-hpc report' takes on a run of a million tasks (issue: task perspective).

Starts a private embedded PostgreSQL in a temporary directory, writes a synthetic
finished app straight into it with generate_series: N tasks (default 1,000,000) of three
modules on 50 workers (fetch 15, calc 30, merge 5) that each ran their attempts back to
back over several hours, with exponential run times, queue waits, batched commits, and
some retries (code 1 then ok, every 29th task), lost attempts (123 then ok, every
4,999th), timeouts (124, every 997th) and final failures (2, three attempts, every
211th). Then times the real command, twice: seconds, peak RSS of the report process,
and the size of the HTML. Usage: bench_report.py [N] [COPY_THE_HTML_TO]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from scalebox_hpc import db
from scalebox_hpc.db.embedded import EmbeddedPostgres

SYNTHETIC_RUN = """
WITH app AS (
    INSERT INTO apps (name, status, site, definition, created_at, started_at, finished_at)
    VALUES ('bench-report', 'FINISHED', 'local', '{}', now() - interval '8 hours', now() - interval '8 hours', now())
    RETURNING id
)
INSERT INTO modules (app_id, name, site, definition, slots)
SELECT app.id, m.name, 'local', '{}', m.slots FROM app,
       (VALUES ('fetch', 15), ('calc', 30), ('merge', 5)) AS m(name, slots);

INSERT INTO workers (module_id, site, status, host, pid, slurm_job_id, lease_expires, started_at, stopped_at)
SELECT m.id, 'local', 'EXITED', 'node' || lpad(((g - 1) %% 10 + 1)::text, 2, '0'), 1000 + g,
       (5000 + g)::text, now(), now() - interval '8 hours', now()
FROM modules m CROSS JOIN LATERAL generate_series(1, m.slots) g
ORDER BY m.id, g;

CREATE TEMP TABLE plan AS
WITH t AS (
    SELECT n, CASE WHEN n <= %(n)s * 0.3 THEN 'fetch' WHEN n <= %(n)s * 0.9 THEN 'calc' ELSE 'merge' END AS module,
           CASE WHEN n %% 211 = 0 THEN 3 WHEN n %% 29 = 0 OR n %% 4999 = 0 THEN 2 ELSE 1 END AS attempts
    FROM generate_series(1, %(n)s) n
), w AS (
    SELECT m.name AS module, array_agg(w.id ORDER BY w.id) AS ids
    FROM workers w JOIN modules m ON m.id = w.module_id GROUP BY m.name
), a AS (
    SELECT t.n, t.module, t.attempts, g.a, w.ids[1 + (t.n * 7 + g.a) %% cardinality(w.ids)] AS worker_id,
           CASE WHEN t.n %% 211 = 0 THEN 2
                WHEN t.n %% 997 = 0 THEN 124
                WHEN t.n %% 4999 = 0 AND g.a = 1 THEN 123
                WHEN t.n %% 29 = 0 AND g.a = 1 THEN 1
                ELSE 0 END AS code
    FROM t JOIN w USING (module) CROSS JOIN LATERAL generate_series(1, t.attempts) g(a)
), d AS (
    SELECT a.*,
           CASE WHEN code = 124 THEN 600.0
                ELSE -ln(1 - random()) * CASE module WHEN 'fetch' THEN 0.8 WHEN 'calc' THEN 2.0 ELSE 0.3 END
           END AS run,
           0.002 + random() * 0.05 AS held, random() * 30 AS queue_wait, random() * 0.3 AS commit_delay
    FROM a
)
SELECT d.*, sum(held + run + 0.0008) OVER (PARTITION BY worker_id ORDER BY n, a) AS done_at FROM d;

INSERT INTO tasks (id, app_id, module_id, body, headers, status, attempts, worker_id,
                   message_created, inserted_at, ready_at, claimed_at, finished_at)
SELECT p.n, m.app_id, m.id, 'item-' || p.n, '{}', p.code, p.attempts, p.worker_id,
       s.t0 + make_interval(secs => p.done_at - p.run - p.held - p.queue_wait - 0.5),
       s.t0 + make_interval(secs => p.done_at - p.run - p.held - p.queue_wait - 0.4),
       s.t0 + make_interval(secs => p.done_at - p.run - p.held - p.queue_wait),
       s.t0 + make_interval(secs => p.done_at - p.run - p.held),
       s.t0 + make_interval(secs => p.done_at + p.commit_delay)
FROM plan p JOIN modules m ON m.name = p.module AND m.app_id = (SELECT max(id) FROM apps),
     (SELECT now() - interval '8 hours' AS t0) s
WHERE p.a = p.attempts;
SELECT setval('tasks_id_seq', %(n)s);

INSERT INTO task_exec (task_id, attempt, status_code, worker_id, t_ready, t_claimed, t_received,
                       t_program_start, t_program_end, t_stageout_start, t_stageout_end,
                       t_sink_committed, t_completed, stdout, note)
SELECT n, a, code, worker_id,
       t0 + make_interval(secs => done_at - run - held - queue_wait),
       t0 + make_interval(secs => done_at - run - held - 0.0008),
       t0 + make_interval(secs => done_at - run - 0.0008),
       t0 + make_interval(secs => done_at - run - 0.0005),
       t0 + make_interval(secs => done_at - 0.0005),
       t0 + make_interval(secs => done_at - 0.0005),
       t0 + make_interval(secs => done_at),
       t0 + make_interval(secs => done_at + commit_delay),
       t0 + make_interval(secs => done_at + commit_delay),
       'item-' || n || ' attempt ' || a || E' done\\n',
       CASE code WHEN 123 THEN 'lease lost: the worker died or stopped heart-beating' END
FROM plan, (SELECT now() - interval '8 hours' AS t0) s;

UPDATE apps SET created_at = (SELECT min(message_created) FROM tasks),
                started_at = (SELECT min(message_created) FROM tasks),
                finished_at = (SELECT max(t_completed) FROM task_exec);
"""


def timed_report(env: dict, app_id: int, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one 'scalebox-hpc report' process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "report", str(app_id), "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"report failed: {proc.stderr.read().strip()}")
    print(f"  {proc.stdout.read().strip()}")
    return seconds, usage.ru_maxrss / 1024      # Linux: ru_maxrss is in KiB


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    base = tempfile.mkdtemp(prefix="sbx-bench-report-")
    os.chmod(base, 0o755)        # as root the server runs as another account that must enter it
    server = EmbeddedPostgres(base)
    try:
        dsn = server.ensure_running()
        with db.connect(dsn) as conn:
            db.upgrade(conn)
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.transaction():
                for statement in SYNTHETIC_RUN.split(";\n"):
                    if statement.strip():
                        conn.execute(statement, {"n": n})
            conn.execute("VACUUM ANALYZE tasks")     # as autovacuum would have by the time anyone reports
            conn.execute("VACUUM ANALYZE task_exec")
            app_id, tasks, attempts, workers = conn.execute(
                "SELECT max(a.id), (SELECT count(*) FROM tasks), (SELECT count(*) FROM task_exec), "
                "(SELECT count(*) FROM workers) FROM apps a").fetchone()
        print(f"synthetic run: {tasks:,} tasks, {attempts:,} attempts, {workers} workers, 3 modules "
              f"(written in {time.perf_counter() - started:.0f} s)")
        env = {k: v for k, v in os.environ.items() if k not in ("PGHOST", "PGDATABASE")}
        env.update(SCALEBOX_DSN=dsn, SCALEBOX_STATE_DIR=str(Path(base) / "state"),
                   SCALEBOX_CONFIG=str(Path(base) / "none.yaml"))
        out = Path(base) / "report.html"
        for label in ("first run", "second run"):
            seconds, rss = timed_report(env, app_id, out)
            print(f"report ({label}): {seconds:.1f} s, peak RSS of the report process {rss:.0f} MB, "
                  f"HTML {out.stat().st_size / 1e6:.2f} MB (targets: well under a minute, a few MB)")
        if len(sys.argv) > 2:
            shutil.copy(out, sys.argv[2])
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What the benchmarks share: run an app the way a user does ('scalebox-hpc run --json'),
check that all its tasks succeeded, and read its steady-state time from the task record.
Imported by the bench_*.py scripts (run from anywhere: their own directory is on sys.path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg


def run_app(app_dir: Path, env: dict, *args: str, what: str, tasks: int) -> dict:
    """The run's --json summary; exits with one line if the run failed or a task of module
    'm' did not succeed."""
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", *args, str(app_dir)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what}: run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    summary = json.loads(proc.stdout)
    ok = summary["modules"]["m"]["ok"]
    if ok != tasks:
        sys.exit(f"{what}: {ok} of {tasks} tasks ok")
    return summary


def steady_seconds(env: dict, app_id: int) -> float:
    """From the app's first claim to its last commit: no start-up, no finish detection."""
    dsn = subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    with psycopg.connect(dsn) as conn:
        (busy,), = conn.execute(
            "SELECT extract(epoch FROM max(e.t_completed) - min(e.t_claimed)) FROM task_exec e "
            "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", (app_id,)).fetchall()
    return float(busy)

#!/usr/bin/env python3
"""Slurm site benchmark (issue: Slurm sites).

Starts a private Slurm cluster (tests/env/slurm-up.sh, two fake nodes claiming 32 CPUs
each) and a private PostgreSQL, then runs the controller in this process against a
site of up to W worker jobs with a scheduler runner that counts every Slurm command.
An app of W x 6 tasks (`sleep S`) keeps W worker jobs busy; it prints:

- the time from submit (the app in the database) to the first task running, and to
  W workers running;
- squeue calls per poll cycle while W jobs are alive (target: 1 per site per cycle),
  and per controller step (a step runs every SCALEBOX_POLL_SECONDS);
- sbatch calls for the W workers (arrays: ideally 1).

Usage: bench_slurm.py [W] [S]   (defaults 50 workers, tasks of 5 s)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scalebox_hpc import db  # noqa: E402
from scalebox_hpc.appdef import load_app  # noqa: E402
from scalebox_hpc.controller import Controller, ControllerSettings  # noqa: E402
from scalebox_hpc.db.embedded import EmbeddedPostgres  # noqa: E402
from scalebox_hpc.db.apps import Apps  # noqa: E402
from scalebox_hpc.db.connection import Database  # noqa: E402
from scalebox_hpc.siteconfig import load_site  # noqa: E402
from scalebox_hpc.sites.local import LocalSite  # noqa: E402
from scalebox_hpc.sites.slurm import BatchSite, SlurmCLI  # noqa: E402
from scalebox_hpc.transport import LocalRunner  # noqa: E402

POLL_SECONDS = 5.0
TASKS_PER_WORKER = 6


def slurm_cluster(base: str) -> str:
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-up.sh"), base, "sbxbench", "6957"],
                        capture_output=True, text=True, env=dict(os.environ, SLURM_UP_CLEAN="1", SLURM_UP_CPUS="32"))
    if up.returncode != 0:
        sys.exit(f"the Slurm cluster did not start:\n{up.stderr[-2000:]}")
    return os.path.join(base, "slurm.conf")


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    tmp = tempfile.mkdtemp(prefix="sbx-bench-slurm-")
    os.chmod(tmp, 0o755)
    conf = slurm_cluster(os.path.join(tmp, "slurm"))
    os.environ["SLURM_CONF"] = conf
    server = EmbeddedPostgres(os.path.join(tmp, "pg"))
    try:
        dsn = server.ensure_running()
        with db.connect(dsn) as conn:
            db.upgrade(conn)
        run(tmp, dsn, workers, seconds)
    finally:
        server.stop(mode="immediate")
        if not os.environ.get("SLURM_CONF_KEEP") and conf.startswith(tmp):
            subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-down.sh"), os.path.join(tmp, "slurm")],
                           capture_output=True)


def run(tmp: str, dsn: str, workers: int, seconds: float) -> None:
    site_file = Path(tmp, "bench.yaml")
    site_file.write_text(f"""name: bench
scheduler: slurm
scratch_root: {tmp}/scratch
slurm:
  walltime: "00:20:00"
  job_name_prefix: sbxb
pool:
  max_workers: {workers}
  max_queued_jobs: {workers}
  max_submissions_per_minute: 30
  idle_seconds: 5
  poll_seconds: {POLL_SECONDS:g}
""")
    app_dir = Path(tmp, "app")
    app_dir.mkdir()
    # Distinct bodies (a repeated body would run once): sleep times a hair apart.
    (app_dir / "bodies.txt").write_text("".join(f"{seconds + i / 10000:.4f}\n"
                                                for i in range(TASKS_PER_WORKER * workers)))
    (app_dir / "code").mkdir()
    (app_dir / "code" / "nap.sh").write_text('#!/bin/sh\nexec sleep "$1"\n')
    (app_dir / "code" / "nap.sh").chmod(0o755)
    (app_dir / "app.yaml").write_text(
        f"name: bench-slurm\nmodules:\n  m:\n    base_image: host\n    code_path: ./code\n    command: ./nap.sh\n"
        f"    start_task: FILE:bodies.txt\n    slots: {workers}\n    site: bench\n")
    settings = ControllerSettings(dsn=dsn, state_dir=tmp, lease_seconds=30, idle_seconds=5,
                                  poll_seconds=1.0)
    runner = LocalRunner()
    site = BatchSite(load_site(site_file), settings, SlurmCLI(runner))
    controller = Controller(settings, sites={"local": LocalSite(settings), "bench": site})

    app = load_app(str(app_dir))
    app_json = app.to_json()
    modules = [dict(app_json["modules"][name], site=mod.site or "bench") for name, mod in app.modules.items()]
    apps = Apps(Database(dsn))
    t_submit = time.time()
    app_id = apps.create_app(app_json, modules, [(n, b) for n, m in app.modules.items() for b in m.start_tasks])

    all_running = None
    steps = 0
    window = None            # (time, squeue calls, steps) when W workers run
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            controller.step()
            steps += 1
            running, (status,) = conn.execute(
                "SELECT count(*) FROM workers WHERE status = 'RUNNING' AND site = 'bench'").fetchone()[0], \
                conn.execute("SELECT status FROM apps WHERE id = %s", (app_id,)).fetchone()
            if all_running is None and running >= workers:
                all_running = time.time()
                window = (time.monotonic(), runner.calls.get("squeue", 0), steps)
            if status != "RUNNING":
                break
            time.sleep(max(0.0, settings.poll_seconds - 0.05))
        ok, total = conn.execute("SELECT count(*) FILTER (WHERE status = 0), count(*) FROM tasks").fetchone()
        print(f"{ok} of {total} tasks ok, app {status} {time.time() - t_submit:.1f} s after submit")
        if ok != total:
            sys.exit("tasks failed: the figures would mean nothing")
        if window is None:
            sys.exit(f"never had {workers} workers running at once")
        # The first program start, as the worker recorded it (same clock: one machine).
        (first_running,), = conn.execute("SELECT extract(epoch FROM min(t_program_start)) FROM task_exec")
        first_running = float(first_running)
    elapsed = time.monotonic() - window[0]
    squeue = runner.calls.get("squeue", 0) - window[1]
    cycles = elapsed / POLL_SECONDS
    step_count = steps - window[2]
    sbatch = runner.calls.get("sbatch", 0)
    print(f"slurm site, {workers} worker jobs, {TASKS_PER_WORKER * workers} tasks of {seconds:g} s, poll_seconds "
          f"{POLL_SECONDS:g}, controller step every {settings.poll_seconds:g} s; app {status}")
    print(f"submit -> first task running: {first_running - t_submit:.2f} s; "
          f"-> {workers} workers running: {all_running - t_submit:.2f} s")
    print(f"squeue calls while {workers} jobs were alive ({elapsed:.1f} s, {step_count} controller steps): "
          f"{squeue} = {squeue / cycles:.2f} per poll cycle (target 1 per site per cycle), "
          f"{squeue / max(step_count, 1):.2f} per controller step")
    print(f"sbatch calls: {sbatch} for {workers} workers; scontrol calls: {runner.calls.get('scontrol', 0)}; "
          f"scancel calls: {runner.calls.get('scancel', 0)}")


if __name__ == "__main__":
    main()

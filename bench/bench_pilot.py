#!/usr/bin/env python3
"""Pilots on the embedded default (issue 11), each figure against its ideal, in one run:

1. fill: one local pilot of 16 lanes (site config cpus: 16), 320 tasks of 'sleep 0.5':
   tasks/s from the first claim to the last commit against the ideal 32/s;
2. stage latency: a first stage whose tasks each send one message to a second stage
   with free lanes waiting: from the message's commit (the task row's inserted_at) to
   its claim, p50 and p99;
3. claim latency: one pilot's claim (sbx_claim, one lane, one task), with 10,000 and
   with 1,000,000 ready tasks queued: p50 and p99 (and the commit of that task apart);
4. scale: 1,000 lanes at once, 25 local pilots of 40 lanes, 10,000 tasks of 'sleep 5':
   tasks/s against the ideal 200/s, the peak of PostgreSQL connections (pg_stat_activity,
   by application_name) per pilot, and the controller's CPU seconds per minute.

Usage: bench_pilot.py [fill|stage|claim|scale ...] (default: all four)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_app(app_dir: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(app_dir)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{app_dir.name}: run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def write_app(app_dir: Path, yaml: str, programs: dict[str, str]) -> None:
    (app_dir / "code").mkdir(parents=True)
    for name, text in programs.items():
        (app_dir / "code" / name).write_text("#!/bin/sh\n" + text)
        (app_dir / "code" / name).chmod(0o755)
    (app_dir / "app.yaml").write_text(yaml)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def fill(tmp: Path, env: dict, dsn: str) -> None:
    n, lanes, seconds = 320, 16, 0.5
    app = tmp / "fill"
    write_app(app, "name: bench-fill\nmodules:\n  nap:\n    base_image: host\n    code_path: ./code\n"
                   f"    command: ./nap.sh\n    slots: {lanes}\n    start_task: FILE:bodies.txt\n",
              {"nap.sh": f"exec sleep {seconds}\n"})
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    summary = run_app(app, env)
    with psycopg.connect(dsn) as conn:
        (busy, pilots, most_slot), = conn.execute(
            "SELECT extract(epoch FROM max(e.t_completed) - min(e.t_claimed)), count(DISTINCT e.worker_id), "
            "max(e.slot) FROM task_exec e JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s",
            (summary["id"],)).fetchall()
    ideal = lanes / seconds
    rate = n / float(busy)
    print(f"fill: {n} x sleep {seconds} in {pilots} pilot(s) of {most_slot + 1} lanes: {rate:.1f} tasks/s "
          f"(first claim to last commit) = {rate / ideal:.3f} of the ideal {ideal:g}/s (target >= 0.95); "
          f"end to end {n / summary['elapsed_seconds']:.1f} tasks/s")


def stage(tmp: Path, env: dict, dsn: str) -> None:
    n = 100
    app = tmp / "stage"
    write_app(app, "name: bench-stage\nmodules:\n"
                   "  first:\n    base_image: host\n    code_path: ./code\n    command: ./first.sh\n"
                   "    slots: 1\n    sink_modules: [second]\n    start_task: FILE:bodies.txt\n"
                   "  second:\n    base_image: host\n    command: /bin/true\n    slots: 4\n",
              {"first.sh": 'sleep 0.05\necho "$1" > "$WORK_DIR/sink-tasks.txt"\n'})
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    summary = run_app(app, env)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM e.t_claimed - t.inserted_at) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
            "JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'second'",
            (summary["id"],)).fetchall()
    lat = [float(r[0]) * 1000 for r in rows]
    print(f"stage latency: {len(lat)} messages, commit to claim by a free lane: p50 {statistics.median(lat):.1f} ms, "
          f"p99 {percentile(lat, 99):.1f} ms (target p50 <= 50 ms; single-module workers measured ~1 s)")


def claim(tmp: Path, env: dict, dsn: str) -> None:
    from scalebox_hpc.db.apps import Apps
    from scalebox_hpc.db.connection import Database
    from scalebox_hpc.db.pools import Pools
    from scalebox_hpc.db.queue import Queue
    from scalebox_hpc.db.rows import TaskResult
    from scalebox_hpc.retry import RetryRules

    figures = {}
    for queued in (10_000, 1_000_000):
        database = Database(dsn)
        apps, pools, queue = Apps(database), Pools(database), Queue(database)
        mod = {"name": "m", "site": "local", "command": "@noop", "base_image": "host", "retry_rules": [],
               "slots": 1000}
        t0 = time.perf_counter()
        app_id = apps.create_app({"name": f"claim-{queued}", "site": "local"}, [mod],
                                 [("m", str(i)) for i in range(queued)])
        database.conn.execute("ANALYZE tasks")
        made = time.perf_counter() - t0
        module_id = apps.module_id(app_id, "m")
        worker_id = pools.create_worker(module_id, "local", 600)
        queue.start_worker(worker_id, host="bench", ip="127.0.0.1", pid=os.getpid(), slurm_job_id=None,
                           lease_seconds=600, cpus=1)
        claims, commits = [], []
        for i in range(2000):
            t0 = time.perf_counter()
            tasks = queue.claim_pilot(worker_id=worker_id, host="bench", entries=[(module_id, 0, 1)])
            t1 = time.perf_counter()
            queue.complete(worker_id=worker_id, app_id=app_id, results=[
                TaskResult(t.id, t.attempt, 0, {"task_id": t.id, "attempt": t.attempt, "worker_id": worker_id,
                                                "status_code": 0}, module_id=module_id) for t in tasks],
                retry_rules=RetryRules.from_json([]))
            claims.append((t1 - t0) * 1000)
            commits.append((time.perf_counter() - t1) * 1000)
        claims, commits = claims[100:], commits[100:]      # warm-up
        figures[queued] = (statistics.median(claims), percentile(claims, 99))
        print(f"claim latency, {queued:,} ready ({made:.0f} s to queue): claim of one task p50 "
              f"{figures[queued][0]:.2f} ms, p99 {figures[queued][1]:.2f} ms; its commit p50 "
              f"{statistics.median(commits):.2f} ms")
        apps.set_app_status(app_id, "CANCELLED", ["RUNNING"], "benchmark done")
        database.close()
    (p50_small, p99_small), (p50_big, p99_big) = figures[10_000], figures[1_000_000]
    print(f"claim latency 1M / 10k: p50 {p50_big / p50_small:.2f}x, p99 {p99_big / p99_small:.2f}x (target <= 1.5x)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself (not of its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale(tmp: Path, env: dict, dsn: str) -> None:
    pilots, lanes, n, seconds = 25, 40, 10_000, 5
    sites = tmp / "sites-scale"
    sites.mkdir()
    (sites / "local.yaml").write_text(
        f"name: local\nscheduler: local\ncpus: {lanes}\npool:\n  max_workers: {pilots}\n"
        f"  max_queued_jobs: {pilots}\n  max_submissions_per_minute: 1000\n  idle_seconds: 2\n")
    app = tmp / "scale"
    write_app(app, "name: bench-scale\nmodules:\n  nap:\n    base_image: host\n    code_path: ./code\n"
                   f"    command: ./nap.sh\n    slots: {pilots * lanes}\n    start_task: FILE:bodies.txt\n",
              {"nap.sh": f"exec sleep {seconds}\n"})
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(app)],
                            env=dict(env, SCALEBOX_SITES_DIR=str(sites)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = (0, 0, 0)        # (connections of pilots, pilots holding them, their most per pilot)
    controller_peak, cpu, started = 0, 0.0, time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while proc.poll() is None:
            rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                                "WHERE application_name LIKE 'scalebox-hpc%%' GROUP BY 1").fetchall()
            per_pilot = [c for name, c in rows if name.startswith("scalebox-hpc worker ")]
            controller_peak = max(controller_peak, sum(c for name, c in rows if name == "scalebox-hpc controller"))
            if sum(per_pilot) > peak[0]:
                peak = (sum(per_pilot), len(per_pilot), max(per_pilot))
            cpu = cpu_seconds(proc.pid)
            time.sleep(0.2)
    wall = time.monotonic() - started
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"scale: run failed ({proc.returncode}): {err.strip()[-500:]}")
    summary = json.loads(out)
    with psycopg.connect(dsn) as conn:
        (busy, ok, workers), = conn.execute(
            "SELECT extract(epoch FROM max(e.t_completed) - min(e.t_claimed)), count(*) FILTER "
            "(WHERE e.status_code = 0), count(DISTINCT e.worker_id) FROM task_exec e JOIN tasks t "
            "ON t.id = e.task_id WHERE t.app_id = %s", (summary["id"],)).fetchall()
    if ok != n:
        sys.exit(f"scale: {ok} of {n} tasks ok")
    ideal = pilots * lanes / seconds
    rate = n / float(busy)
    print(f"scale: {n:,} x sleep {seconds} on {workers} pilots x {lanes} lanes: {rate:.1f} tasks/s "
          f"(first claim to last commit) = {rate / ideal:.3f} of the ideal {ideal:g}/s (target >= 0.9); "
          f"end to end {n / summary['elapsed_seconds']:.1f}/s")
    print(f"scale: peak PostgreSQL connections of pilots {peak[0]} for {peak[1]} pilots = "
          f"{peak[0] / max(1, peak[1]):.2f} per pilot, at most {peak[2]} for one (target <= 2); "
          f"controller {controller_peak}")
    print(f"scale: controller CPU {cpu:.1f} s in {wall:.0f} s = {cpu / wall * 60:.1f} CPU s per minute")


def main() -> None:
    wanted = sys.argv[1:] or ["fill", "stage", "claim", "scale"]
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        (tmp / "sites").mkdir()
        # The local site's pilot has 16 lanes whatever this machine has: sleeping tasks
        # need no core of their own.
        (tmp / "sites" / "local.yaml").write_text("name: local\nscheduler: local\ncpus: 16\n")
        env = {k: v for k, v in os.environ.items() if k not in ("SCALEBOX_DSN", "PGHOST", "PGDATABASE")}
        env.update(SCALEBOX_STATE_DIR=str(tmp / "state"), SCALEBOX_IDLE_SECONDS="2",
                   SCALEBOX_CONFIG=str(tmp / "none.yaml"), SCALEBOX_SITES_DIR=str(tmp / "sites"))
        dsn = subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        try:
            for name in wanted:
                {"fill": fill, "stage": stage, "claim": claim, "scale": scale}[name](tmp, env, dsn)
        finally:
            time.sleep(2)
            subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    main()

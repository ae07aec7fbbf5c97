#!/usr/bin/env python3
"""Dispatch throughput on the embedded default (issue: core engine benchmark).

1. floor: N plain subprocess.run(['/bin/true']) calls spread over 2 processes;
2. scalebox-hpc: an app with N tasks of a module whose program is /bin/true on the
   local site (one pilot of 2 lanes, slots: 2), embedded PostgreSQL, timed from app
   creation to FINISHED;
3. queue: M tasks of the in-worker no-op program '@noop' (no process start), the
   same pilot, to measure the queue itself.
Steps 1 and 2 alternate R times (default 3): this machine's speed drifts by as much as 20%
from one minute to the next, so each round's ratio is against the floor measured just
before it, and the median round is the figure. Prints the figures and the ratios.
Usage: bench_dispatch.py [N] [M] [R]
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_app, steady_seconds


def _true_loop(n: int) -> None:
    for _ in range(n):
        subprocess.run(["/bin/true"])


def floor(n: int) -> float:
    started = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        pool.map(_true_loop, [n // 2, n - n // 2])
    return n / (time.perf_counter() - started)


def scalebox(app_dir: Path, name: str, command: str, n: int, env: dict) -> tuple[float, dict]:
    app_dir.mkdir(parents=True)
    (app_dir / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    (app_dir / "app.yaml").write_text(
        f"name: {name}\nmodules:\n  m:\n    base_image: host\n    command: {command}\n"
        "    slots: 2\n    start_task: FILE:bodies.txt\n")
    summary = run_app(app_dir, env, what=name, tasks=n)
    return n / summary["elapsed_seconds"], n / steady_seconds(env, summary["id"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
    rounds_wanted = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        os.chmod(tmp, 0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("SCALEBOX_DSN", "PGHOST", "PGDATABASE")}
        env.update(SCALEBOX_STATE_DIR=str(Path(tmp) / "state"), SCALEBOX_IDLE_SECONDS="2",
                   SCALEBOX_CONFIG=str(Path(tmp) / "none.yaml"))
        # Start the embedded server before timing anything.
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, check=True,
                       capture_output=True)
        try:
            rounds = []
            for r in range(1, rounds_wanted + 1):
                floor_rate = floor(n)
                rate, steady = scalebox(Path(tmp) / f"true-app-{r}", f"bench-true-{r}", "/bin/true", n, env)
                rounds.append((rate / floor_rate, steady / floor_rate))
                print(f"round {r}: floor {n} x subprocess.run(['/bin/true']) in 2 processes {floor_rate:,.0f} "
                      f"tasks/s; scalebox-hpc {n} /bin/true tasks, one pilot of 2 lanes, embedded PostgreSQL "
                      f"{rate:,.0f} tasks/s end to end = {rate / floor_rate:.2f} of the floor, steady state "
                      f"(first claim to last commit) {steady:,.0f} tasks/s = {steady / floor_rate:.2f}", flush=True)
            print(f"scalebox-hpc against the floor, median of {len(rounds)} rounds: "
                  f"{statistics.median(e for e, _ in rounds):.2f} end to end (target >= 0.80), "
                  f"{statistics.median(s for _, s in rounds):.2f} steady state", flush=True)
            qrate, qsteady = scalebox(Path(tmp) / "noop-app", "bench-noop", "'@noop'", m, env)
            print(f"queue: {m} no-op tasks, one pilot of 2 lanes: {qrate:,.0f} tasks/s end to end (target >= 5,000); "
                  f"steady state {qsteady:,.0f} tasks/s")
        finally:
            # Workers leave within a second of their app finishing; let them sign off.
            time.sleep(2)
            subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    main()

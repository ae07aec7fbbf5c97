#!/usr/bin/env python3
"""What an HPC user would do instead of scalebox-hpc, on the same test cluster (issue 11).

Starts a private Slurm cluster (tests/env/slurm-up.sh; its node n3 has 4 CPUs, alone in
partition 'big') and the embedded PostgreSQL, then runs N tasks of /bin/true (default
2,000) on that one 4-CPU node three ways, one after the other:

1. a Slurm job array: one array element per task, `sbatch --array`, in arrays of at
   most the cluster's MaxArraySize, all submitted at once, waited for with --wait;
2. srun steps in one allocation: one job of 4 tasks running `srun -n1 --exact /bin/true`
   per task, 4 at a time (xargs -P 4);
3. scalebox-hpc: one pilot job (cpus_per_task 4, so 4 lanes) running an app of N tasks.

Each is timed from submission to the last task's end, as the user waits for it; prints
tasks/s of each and scalebox-hpc's ratio to each.

Usage: bench_slurm_peers.py [N]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_app, steady_seconds

REPO = Path(__file__).resolve().parent.parent
ARRAY_MAX = 1000          # tests/env/slurm-up.sh sets MaxArraySize=1001: indices 0-1000


def slurm_cluster(base: str) -> str:
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-up.sh"), base, "sbxpeers", "6977"],
                        capture_output=True, text=True, env=dict(os.environ, SLURM_UP_CLEAN="1"))
    if up.returncode != 0:
        sys.exit(f"the Slurm cluster did not start:\n{up.stderr[-2000:]}")
    return os.path.join(base, "slurm.conf")


def job_array(n: int, env: dict, workers: int = 4) -> float:
    """At most `workers` elements at once (%N) on the 4-CPU node; arrays of at most
    MaxArraySize, one after the other (so the limit holds across them)."""
    started = time.perf_counter()
    for first in range(0, n, ARRAY_MAX):
        last = min(n, first + ARRAY_MAX) - 1
        done = subprocess.run(
            ["sbatch", "--wait", "--quiet", "-p", "big", "-c", "1", f"--array=0-{last - first}%{workers}",
             "-o", "/dev/null", "--job-name", "peers-array", "--wrap", "/bin/true"], env=env)
        if done.returncode != 0:
            sys.exit("job array: an array failed")
    return n / (time.perf_counter() - started)


def srun_steps(n: int, env: dict, tmp: Path, workers: int = 4) -> float:
    script = tmp / "steps.sh"
    script.write_text("#!/bin/bash\n"
                      f"seq {n} | xargs -P {workers} -n 1 srun -n1 -c1 --exact --quiet /bin/true\n")
    started = time.perf_counter()
    subprocess.run(["sbatch", "--wait", "--quiet", "-p", "big", "-N1", f"-n{workers}", "-c1",
                    "-o", str(tmp / "steps.out"),
                    "--job-name", "peers-steps", str(script)], env=env, check=True)
    return n / (time.perf_counter() - started)


def scalebox(n: int, env: dict, tmp: Path, workers: int = 4) -> tuple[float, float]:
    sites = tmp / "sites"
    sites.mkdir(exist_ok=True)
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    (sites / "bench.yaml").write_text(
        f"name: bench\nscheduler: slurm\nscratch_root: {scratch}\nslurm:\n  partition: big\n"
        f"  cpus_per_task: {workers}\n"
        "  walltime: \"00:30:00\"\npool:\n  max_workers: 1\n  poll_seconds: 1\n  idle_seconds: 2\n")
    app = tmp / "app"
    app.mkdir(exist_ok=True)
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    (app / "app.yaml").write_text("name: peers-true\nmodules:\n  m:\n    base_image: host\n    command: /bin/true\n"
                                  f"    slots: {workers}\n    start_task: FILE:bodies.txt\n")
    env = dict(env, SCALEBOX_SITES_DIR=str(sites))
    started = time.perf_counter()
    summary = run_app(app, env, "-q", "--site", "bench", what="scalebox-hpc", tasks=n)
    elapsed = time.perf_counter() - started
    return n / elapsed, n / steady_seconds(env, summary["id"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-peers-"))
    os.chmod(tmp, 0o755)
    conf = slurm_cluster(str(tmp / "slurm"))
    env = {k: v for k, v in os.environ.items() if k not in ("SCALEBOX_DSN", "PGHOST", "PGDATABASE")}
    env.update(SLURM_CONF=conf, SCALEBOX_STATE_DIR=str(tmp / "state"), SCALEBOX_CONFIG=str(tmp / "none.yaml"))
    subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, check=True, capture_output=True)
    try:
        array = job_array(n, env)
        print(f"slurm job array: {n:,} x /bin/true on one 4-CPU node: {array:,.1f} tasks/s (submit to last end)")
        steps = srun_steps(n, env, tmp)
        print(f"srun steps in one allocation (4 at a time): {steps:,.1f} tasks/s (submit to last end)")
        ours, steady = scalebox(n, env, tmp)
        print(f"scalebox-hpc: one pilot job of 4 lanes: {ours:,.1f} tasks/s (submit to FINISHED); "
              f"steady {steady:,.1f}/s (first claim to last commit)")
        print(f"scalebox-hpc / job array = {ours / array:.1f}x; scalebox-hpc / srun steps = {ours / steps:.1f}x")
    finally:
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], env=env, capture_output=True)
        subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-down.sh"), str(tmp / "slurm")],
                       capture_output=True)


if __name__ == "__main__":
    main()

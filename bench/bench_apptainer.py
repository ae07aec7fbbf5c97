#!/usr/bin/env python3
"""Container overhead per task (issue: Apptainer modules).

1. floor: N x `apptainer exec IMAGE /bin/true`, one after another (what any tool that
   starts one container per task pays at least);
2. exec mode: an app of N /bin/true tasks in IMAGE, one worker, one `apptainer exec`
   per task;
3. instance mode: the same with container_mode: instance (one instance for the worker,
   its agent starting each task's program).
Per-task time of 2 and 3 is taken from the first claim to the last commit (no start-up or
finish detection in it; the instance start is in it). Prints seconds per task and the
ratios: exec / floor (target <= 1.1) and exec / instance (target >= 3).

Needs apptainer (or singularity) on PATH and an image: BENCH_IMAGE=path.sif, else the
test image of tests/env/apptainer-up.sh (set up if missing).
Usage: bench_apptainer.py [N]   (default 100)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_app, steady_seconds

REPO = Path(__file__).resolve().parent.parent


def ensure_apptainer() -> str:
    image = os.environ.get("BENCH_IMAGE")
    if image and shutil.which("apptainer"):
        return image
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "apptainer-up.sh"), "/tmp/sbx-apptainer-env"],
                        capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"apptainer-up.sh failed:\n{up.stderr[-2000:]}")
    for line in up.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        os.environ[key] = os.path.expandvars(value.strip("'\""))
    return image or os.environ["SBX_TEST_IMAGE_SIF"]


def floor(image: str, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        subprocess.run(["apptainer", "exec", image, "/bin/true"], check=True)
    return (time.perf_counter() - started) / n


def per_task(tmp: Path, env: dict, image: str, mode: str, n: int) -> float:
    app = tmp / f"app-{mode}"
    app.mkdir()
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    (app / "app.yaml").write_text(
        f"name: bench-{mode}\nmodules:\n  m:\n    base_image: {image}\n    command: /bin/true\n"
        f"    container_mode: {mode}\n    slots: 1\n    start_task: FILE:bodies.txt\n")
    summary = run_app(app, env, what=mode, tasks=n)
    return steady_seconds(env, summary["id"]) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    image = ensure_apptainer()
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-appt-"))
    os.chmod(tmp, 0o755)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("SCALEBOX_DSN", "PGHOST", "PGDATABASE")}
        env.update(SCALEBOX_STATE_DIR=str(tmp / "state"), SCALEBOX_IDLE_SECONDS="2",
                   SCALEBOX_CONFIG=str(tmp / "none.yaml"), SCALEBOX_SCRATCH=str(tmp / "scratch"),
                   PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, check=True, capture_output=True)
        base = floor(image, n)
        print(f"floor: {n} x 'apptainer exec {os.path.basename(image)} /bin/true': {base * 1000:.1f} ms per task")
        exec_mode = per_task(tmp, env, image, "exec", n)
        print(f"exec mode: {exec_mode * 1000:.1f} ms per task = {exec_mode / base:.2f} x the floor (target <= 1.1)")
        inst = per_task(tmp, env, image, "instance", n)
        print(f"instance mode: {inst * 1000:.1f} ms per task = {inst / base:.2f} x the floor; "
              f"exec mode / instance mode = {exec_mode / inst:.1f} (target >= 3)")
    finally:
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], env=env, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""scalebox-hpc side by side with what users would pick instead, measured in one run
(issue 13). Started by bench/peers/run, which installs the peers first.

Three workloads, each system with the same number of workers (--workers, default 2:
this machine's cores), back to back, --repeat times (default 3), interleaved so that
every system meets the same machine:

- process per task: N x /bin/true (default 20,000): scalebox-hpc on the embedded default
  (one pilot of WORKERS lanes), Parsl HTEX bash_app (LocalProvider), Dask LocalCluster
  (subprocess.run in each task), HyperQueue (its Python package's LocalCluster), GNU
  parallel; and on the test Slurm cluster (tests/env/slurm-up.sh) a job array and srun
  steps in one allocation, WORKERS at a time, with scalebox-hpc there too (one pilot
  job): 500 tasks (x --scale), as a job array of 20,000 would take an hour at Slurm's
  rate of a few jobs a second;
- no process: M no-op tasks (default 100,000): our in-worker '@noop', Parsl python_app,
  Dask, procrastinate on the same PostgreSQL, and a bare FOR UPDATE SKIP LOCKED queue
  taking 50 rows a transaction (the ceiling of any PostgreSQL queue);
- pipeline: K items (default 10,000) through three no-op stages, each system chaining
  them its own way: our '@pass' modules routed by sink_modules, Parsl and Dask futures
  passed on, procrastinate jobs deferring the next, the bare queue inserting the next
  stage's row in the same transaction.

Per system: startup (to a warm system: for peers, the cluster up and one task run; for
us, from `run` to the first claim, which includes inserting the tasks), steady tasks/s
(peers: from submitting the tasks to the last done; us: first claim to last commit) and
end to end (the whole command, interpreter start included), as median (min-max) over
the repeats, then our ratios. --scale shrinks every count for a quick look.

Usage: compare.py [--repeat R] [--scale S] [--workers W] [--no-slurm] [--json FILE] | --table FILE
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchlib import steady_seconds  # noqa: E402

PEERS_PYTHON = HERE / ".venv" / "bin" / "python"
WORKLOADS = {
    "true": "process per task (/bin/true)",
    "noop": "no process (no-op tasks)",
    "pipeline": "3-stage pipeline (no-op stages)",
}


class Failed(Exception):
    """One run of one system did not complete: reported in the table, not fatal."""


# -- scalebox-hpc --------------------------------------------------------------------------

def ours(workload: str, n: int, workers: int, env: dict, tmp: Path, tag: str) -> dict:
    """One pilot of `workers` lanes (the local site's cpus); every module may use all of
    them (slots: a module's default is 1 task at a time)."""
    app = tmp / f"app-{workload}-{tag}"
    app.mkdir()
    (app / "bodies.txt").write_text("".join(f"{i}\n" for i in range(n)))
    slots = f"    slots: {workers}\n"
    if workload == "pipeline":
        modules = (f"  a:\n    command: '@pass'\n    sink_modules: [b]\n    start_task: FILE:bodies.txt\n{slots}"
                   f"  b:\n    command: '@pass'\n    sink_modules: [c]\n{slots}"
                   f"  c:\n    command: '@noop'\n{slots}")
        expected = {"a": n, "b": n, "c": n}
    else:
        command = "/bin/true" if workload == "true" else "'@noop'"
        modules = f"  m:\n    base_image: host\n    command: {command}\n    start_task: FILE:bodies.txt\n{slots}"
        expected = {"m": n}
    (app / "app.yaml").write_text(f"name: peers-{workload}\nmodules:\n{modules}")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(app)], env=env,
                          capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise Failed(f"run failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    summary = json.loads(proc.stdout)
    got = {name: m["ok"] for name, m in summary["modules"].items()}
    if got != expected:
        raise Failed(f"tasks ok {got}, expected {expected}")
    steady = steady_seconds(env, summary["id"])
    return {"startup": total - steady, "steady": steady, "total": total, "tasks": sum(expected.values())}


# -- the peers in their venv ----------------------------------------------------------------

def peer(system: str, workload: str, n: int, workers: int, dsn: str | None, tmp: Path) -> dict:
    argv = [str(PEERS_PYTHON), str(HERE / "peer.py"), system, workload, str(n), str(workers)]
    if dsn:
        argv.append(dsn)
    # The venv's bin on PATH, as if activated (Parsl starts its interchange from there).
    env = dict(os.environ, PATH=f"{PEERS_PYTHON.parent}:{os.environ.get('PATH', '')}")
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, timeout=3600, env=env)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Failed(f"exit {proc.returncode}: {last[-300:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tasks = 3 * n if workload == "pipeline" else n
    return {"startup": result["startup"], "steady": result["steady"], "total": total, "tasks": tasks}


def gnu_parallel(n: int, workers: int, tmp: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(["parallel", "--will-cite", "-j", str(workers), "-N0", "/bin/true"],
                          input="".join(f"{i}\n" for i in range(n)), capture_output=True, text=True, cwd=tmp)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise Failed(f"parallel exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return {"startup": 0.0, "steady": total, "total": total, "tasks": n}


class SlurmPeers:
    """The test Slurm cluster of bench_slurm_peers.py (its 4-CPU node n3), WORKERS at a time."""

    def __init__(self, tmp: Path, env: dict):
        import bench_slurm_peers as bsp
        self.bsp = bsp
        self.tmp = tmp
        conf = bsp.slurm_cluster(str(tmp / "slurm"))
        self.env = dict(env, SLURM_CONF=conf)

    def run(self, system: str, n: int, workers: int, tag: str) -> dict:
        tmp = self.tmp / f"slurm-{system}-{tag}"
        tmp.mkdir()
        started = time.perf_counter()
        if system == "slurm job array":
            self.bsp.job_array(n, self.env, workers)
            steady = None
        elif system == "slurm srun steps":
            self.bsp.srun_steps(n, self.env, tmp, workers)
            steady = None
        else:
            _, rate = self.bsp.scalebox(n, self.env, tmp, workers)
            steady = n / rate
        total = time.perf_counter() - started
        return {"startup": 0.0 if steady is None else total - steady, "steady": steady or total,
                "total": total, "tasks": n}


# -- the table ------------------------------------------------------------------------------

def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(results: dict, counts: dict) -> str:
    """Per workload, each system's figures and our ratios against it: against the
    scalebox-hpc run of the same task count (the Slurm peers against scalebox-hpc on
    Slurm)."""
    lines = []
    for workload, systems in results.items():
        lines.append(f"\n{WORKLOADS.get(workload, workload)}: {counts[workload]:,} "
                     f"{'items x 3 stages' if workload == 'pipeline' else 'tasks'}")
        lines.append(f"  {'system':<28} {'steady tasks/s':>24} {'startup s':>18} {'end to end s':>20} "
                     f"{'ours/them steady':>17} {'ours/them e2e':>14}")
        ours_by_count = {}
        for system, entry in systems.items():
            if system.startswith("scalebox-hpc") and entry["runs"]:
                runs = entry["runs"]
                ours_by_count[runs[0]["tasks"]] = (statistics.median([r["tasks"] / r["steady"] for r in runs]),
                                                   statistics.median([r["total"] for r in runs]))
        for system, entry in systems.items():
            runs, errors = entry["runs"], entry["errors"]
            if not runs:
                lines.append(f"  {system:<28} failed: {errors[0] if errors else 'not run'}")
                continue
            rates = [r["tasks"] / r["steady"] for r in runs]
            totals = [r["total"] for r in runs]
            ratio = ratio_e2e = ""
            base = ours_by_count.get(runs[0]["tasks"])
            if base and not system.startswith("scalebox-hpc"):
                ratio = f"{base[0] / statistics.median(rates):.2f}"
                ratio_e2e = f"{statistics.median(totals) / base[1]:.2f}"
            lines.append(f"  {system:<28} {_spread(rates, ',.0f'):>24} {_spread([r['startup'] for r in runs], '.2f'):>18} "
                         f"{_spread(totals, '.1f'):>20} {ratio:>17} {ratio_e2e:>14}")
            if errors:
                lines.append(f"  {'':<28} ({len(errors)} run(s) failed: {errors[0]})")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    out = subprocess.run([str(PEERS_PYTHON), "-c",
                          "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
                          "('parsl', 'dask', 'distributed', 'hyperqueue', 'procrastinate')))"],
                         capture_output=True, text=True).stdout.strip()
    par = subprocess.run(["parallel", "--version"], capture_output=True, text=True).stdout.splitlines()
    return out + (f", {par[0]}" if par else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every task count (e.g. 0.1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-slurm", action="store_true", help="leave out the Slurm job array and srun steps")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier run's --json file")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(f"machine: {saved['machine']}\npeers: {saved['peers']}\nworkers: {saved['workers']} per system")
        print(table(saved["results"], saved["counts"]))
        return
    if not PEERS_PYTHON.exists():
        sys.exit(f"{PEERS_PYTHON} is missing: run bench/peers/run (it installs the peers)")
    counts = {"true": int(20000 * args.scale), "noop": int(100000 * args.scale), "pipeline": int(10000 * args.scale)}
    slurm_n = max(10, int(500 * args.scale))
    w = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="sbx-peers-"))
    os.chmod(tmp, 0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SCALEBOX_DSN", "PGHOST", "PGDATABASE")}
    sites = tmp / "sites"
    sites.mkdir()
    (sites / "local.yaml").write_text(f"name: local\nscheduler: local\ncpus: {w}\n")
    env.update(SCALEBOX_STATE_DIR=str(tmp / "state"), SCALEBOX_IDLE_SECONDS="2", SCALEBOX_CONFIG=str(tmp / "none"),
               SCALEBOX_SITES_DIR=str(sites))
    dsn = subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "url"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    peer_dsns = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("procrastinate", "skiplocked"):
            conn.execute(f"CREATE DATABASE peers_{name}")
            peer_dsns[name] = make_conninfo(dsn, dbname=f"peers_{name}")
    slurm = None if args.no_slurm else SlurmPeers(tmp, env)

    plan = [("true", "scalebox-hpc"), ("true", "parsl"), ("true", "dask"), ("true", "hyperqueue"),
            ("true", "gnu parallel")]
    if slurm:
        plan += [("true", "slurm job array"), ("true", "slurm srun steps"), ("true", "scalebox-hpc on slurm")]
    plan += [("noop", "scalebox-hpc"), ("noop", "parsl"), ("noop", "dask"), ("noop", "procrastinate"),
             ("noop", "skiplocked"),
             ("pipeline", "scalebox-hpc"), ("pipeline", "parsl"), ("pipeline", "dask"), ("pipeline", "procrastinate"),
             ("pipeline", "skiplocked")]
    names = {"skiplocked": "bare SKIP LOCKED queue"}
    results: dict = {}
    print(f"machine: {machine()}\npeers: {versions()}\nworkers: {w} per system, {args.repeat} repeats",
          flush=True)
    try:
        for rep in range(args.repeat):
            for workload, system in plan:
                n = slurm_n if system.startswith("slurm") or system == "scalebox-hpc on slurm" else counts[workload]
                label = names.get(system, system) + (f" ({n:,})" if n != counts[workload] else "")
                entry = results.setdefault(workload, {}).setdefault(label, {"runs": [], "errors": []})
                tag = f"{rep}"
                try:
                    if system == "scalebox-hpc":
                        run = ours(workload, n, w, env, tmp, tag)
                    elif system == "gnu parallel":
                        run = gnu_parallel(n, w, tmp)
                    elif slurm and (system.startswith("slurm") or system == "scalebox-hpc on slurm"):
                        run = slurm.run(system, n, w, tag)
                    else:
                        run = peer(system, workload, n, w, peer_dsns.get(system), tmp)
                except (Failed, subprocess.TimeoutExpired, SystemExit) as exc:
                    entry["errors"].append(str(exc))
                    print(f"  [{rep + 1}/{args.repeat}] {workload:<8} {label:<26} FAILED: {exc}", flush=True)
                    continue
                entry["runs"].append(run)
                print(f"  [{rep + 1}/{args.repeat}] {workload:<8} {label:<26} {run['tasks'] / run['steady']:>9,.0f} "
                      f"tasks/s steady, startup {run['startup']:.2f} s, end to end {run['total']:.1f} s", flush=True)
    finally:
        time.sleep(2)
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], env=env, capture_output=True)
        if slurm:
            subprocess.run(["bash", str(HERE.parent.parent / "tests" / "env" / "slurm-down.sh"), str(tmp / "slurm")],
                           capture_output=True)
    print(table(results, counts))
    print("\nsteady: peers from submitting the tasks to the last done, scalebox-hpc from its first claim to its "
          "last commit;\nstartup: to a warm system (peers: cluster up, one task run; scalebox-hpc: `run` to the first "
          "claim, inserting the tasks included);\nend to end: the whole command; ratios > 1: scalebox-hpc is faster "
          "(e2e: their time / ours), against our run of the same task count")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "peers": versions(), "workers": w,
                                               "counts": counts, "results": results}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

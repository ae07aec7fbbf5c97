"""One peer system, one workload, one run: what bench/peers/compare.py starts, in the
peers' own venv (bench/peers/.venv; none of this is a dependency of scalebox-hpc).

    peer.py SYSTEM WORKLOAD N WORKERS [DSN]

SYSTEM: parsl, dask, hyperqueue, procrastinate, skiplocked. WORKLOAD: true (N processes
of /bin/true), noop (N tasks that do nothing, no process), pipeline (N items through
three stages of no-op tasks, chained the way the system chains work). Prints one JSON
line: startup (seconds to a cluster that has run one task), steady (seconds from
submitting the N to the last one done), and what the system ran. Every system gets
WORKERS workers: processes, or for procrastinate worker processes, on this machine.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import tempfile
import time


def run_true(_i=None) -> int:
    return subprocess.run(["/bin/true"]).returncode


def noop(i=None):
    return i


# -- Parsl: HighThroughputExecutor with a LocalProvider, one block of WORKERS workers ----------

def parsl_run(workload: str, n: int, workers: int) -> tuple[float, float]:
    import parsl
    from parsl import bash_app, python_app
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    started = time.perf_counter()
    run_dir = tempfile.mkdtemp(prefix="peers-parsl-")
    config = Config(executors=[HighThroughputExecutor(
        label="htex", max_workers_per_node=workers,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))], run_dir=run_dir,
        initialize_logging=False, usage_tracking=0)
    parsl.load(config)

    @bash_app
    def true_app():
        return "/bin/true"

    @python_app
    def noop_app(x):
        return x

    try:
        noop_app(0).result()
        ready = time.perf_counter()
        if workload == "true":
            futures = [true_app() for _ in range(n)]
        elif workload == "noop":
            futures = [noop_app(i) for i in range(n)]
        else:   # a future passed to an app is a dependency: c(b(a(i)))
            futures = [noop_app(noop_app(noop_app(i))) for i in range(n)]
        for f in futures:
            f.result()
        done = time.perf_counter()
    finally:
        parsl.dfk().cleanup()
    return ready - started, done - ready


# -- Dask: a LocalCluster of WORKERS single-threaded worker processes ------------------------

def dask_run(workload: str, n: int, workers: int) -> tuple[float, float]:
    from dask.distributed import Client, LocalCluster, wait

    started = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(noop, 0, pure=False).result()
        ready = time.perf_counter()
        if workload == "true":
            futures = client.map(run_true, range(n), pure=False)
        elif workload == "noop":
            futures = client.map(noop, range(n), pure=False)
        else:   # futures mapped over futures: each item's stages chain
            futures = client.map(noop, client.map(noop, client.map(noop, range(n), pure=False), pure=False),
                                 pure=False)
        wait(futures)
        assert all(f.status == "finished" for f in futures)
        done = time.perf_counter()
    return ready - started, done - ready


# -- HyperQueue: its Python package's LocalCluster (server and worker in-process) ------------

def hyperqueue_run(workload: str, n: int, workers: int) -> tuple[float, float]:
    from hyperqueue import Job
    from hyperqueue.cluster import LocalCluster, WorkerConfig

    if workload != "true":
        raise SystemExit("hyperqueue runs programs: workload 'true' only")
    started = time.perf_counter()
    with LocalCluster(server_dir=tempfile.mkdtemp(prefix="peers-hq-")) as cluster:
        cluster.start_worker(WorkerConfig(cores=workers))
        client = cluster.client()
        job = Job()
        job.program(["/bin/true"], stdout=None, stderr=None)
        client.wait_for_jobs([client.submit(job)])
        ready = time.perf_counter()
        job = Job()
        for _ in range(n):
            job.program(["/bin/true"], stdout=None, stderr=None)
        client.wait_for_jobs([client.submit(job)])
        done = time.perf_counter()
    return ready - started, done - ready


# -- procrastinate: jobs in PostgreSQL (its own schema, in a database of its own) ------------

def procrastinate_app(dsn: str):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue="peers")
    def noop_task(i: int, stage: int = 3) -> None:
        if stage < 3:       # the pipeline: each stage defers the next
            noop_task.defer(i=i, stage=stage + 1)

    return app, noop_task


def _procrastinate_worker(dsn: str) -> None:
    app, _ = procrastinate_app(dsn)
    with app.open():
        app.run_worker(queues=["peers"], concurrency=1, wait=False, install_signal_handlers=False)


def procrastinate_run(workload: str, n: int, workers: int, dsn: str) -> tuple[float, float]:
    import psycopg

    if workload == "true":
        raise SystemExit("procrastinate is measured without processes: workloads 'noop' and 'pipeline'")
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    app, task = procrastinate_app(dsn)
    with app.open():
        app.schema_manager.apply_schema()
        task.defer(i=0)
        _drain(dsn, 1)
        ready = time.perf_counter()
        stage = 1 if workload == "pipeline" else 3
        for first in range(0, n, 1000):
            task.batch_defer(*({"i": i, "stage": stage} for i in range(first, min(n, first + 1000))))
    _drain(dsn, workers)
    done = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        (succeeded,), = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
    expected = 1 + (3 * n if workload == "pipeline" else n)
    assert succeeded == expected, (succeeded, expected)
    return ready - started, done - ready


def _drain(dsn: str, workers: int) -> None:
    """Worker processes that leave once the queue is empty (wait=False); the pipeline's
    later stages are deferred by the jobs themselves, so drain until nothing is left."""
    import psycopg

    while True:
        procs = [multiprocessing.Process(target=_procrastinate_worker, args=(dsn,)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        with psycopg.connect(dsn) as conn:
            (left,), = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
        if not left:
            return


# -- The ceiling: a bare FOR UPDATE SKIP LOCKED queue, 50 rows a transaction -----------------

def _skiplocked_worker(dsn: str, total: int) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(
                    "DELETE FROM peers_q WHERE id IN (SELECT id FROM peers_q ORDER BY id FOR UPDATE SKIP LOCKED "
                    "LIMIT 50) RETURNING item, stage").fetchall()
                nxt = [(item, stage + 1) for item, stage in rows if stage < 3]
                if nxt:
                    with conn.cursor().copy("COPY peers_q (item, stage) FROM STDIN") as copy:
                        for row in nxt:
                            copy.write_row(row)
                if rows:
                    conn.execute("UPDATE peers_done SET n = n + %s", (len(rows),))
            if not rows:
                (done,), = conn.execute("SELECT n FROM peers_done").fetchall()
                conn.commit()
                if done >= total:
                    return
                time.sleep(0.001)   # another worker holds the last rows (or their next stage)


def skiplocked_run(workload: str, n: int, workers: int, dsn: str) -> tuple[float, float]:
    import psycopg

    if workload == "true":
        raise SystemExit("the bare queue is measured without processes: workloads 'noop' and 'pipeline'")
    started = time.perf_counter()
    stage = 1 if workload == "pipeline" else 3
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS peers_q, peers_done")
        conn.execute("CREATE TABLE peers_q (id bigserial PRIMARY KEY, item integer, stage integer)")
        conn.execute("CREATE TABLE peers_done (n bigint)")
        conn.execute("INSERT INTO peers_done VALUES (0)")
        ready = time.perf_counter()
        with conn.cursor().copy("COPY peers_q (item, stage) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((i, stage))
    total = 3 * n if workload == "pipeline" else n
    procs = [multiprocessing.Process(target=_skiplocked_worker, args=(dsn, total)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    done = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        (count,), = conn.execute("SELECT n FROM peers_done").fetchall()
    assert count == total, (count, total)
    return ready - started, done - ready


def main() -> None:
    system, workload, n, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dsn = sys.argv[5] if len(sys.argv) > 5 else None
    if system == "parsl":
        startup, steady = parsl_run(workload, n, workers)
    elif system == "dask":
        startup, steady = dask_run(workload, n, workers)
    elif system == "hyperqueue":
        startup, steady = hyperqueue_run(workload, n, workers)
    elif system == "procrastinate":
        startup, steady = procrastinate_run(workload, n, workers, dsn)
    elif system == "skiplocked":
        startup, steady = skiplocked_run(workload, n, workers, dsn)
    else:
        raise SystemExit(f"unknown system {system!r}")
    print(json.dumps({"system": system, "workload": workload, "n": n, "startup": startup, "steady": steady}))


if __name__ == "__main__":
    main()

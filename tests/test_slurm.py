"""Apps on a real Slurm cluster (munge + slurmctld + three slurmd fake nodes, started by
tests/env/slurm-up.sh): worker jobs through sbatch, lost jobs, walltime drains, the
submission rate limit and the degraded state, HOST-BOUND tasks on the node of their
data, a node taken down, and pilots that fill a 4-CPU node with 2 fake GPUs."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import EXAMPLES
from test_examples import PIPELINE_HOSTS
from test_faults import ROUTING_APP, assert_routed_once, held_worker, query, wait_for
from test_pilot import max_overlap, module_yaml, runs, write_app


def write_site(sites_dir, name="testcluster", *, walltime="00:30:00", drain=60, partition="main",
               max_workers=4, per_minute=30, queued=8, max_array=None, scratch=None, slurm_keys=""):
    sites_dir.mkdir(exist_ok=True)
    if scratch is None:
        # A scratch of this test's own (worker ids restart with every test database), which
        # the unprivileged Apptainer user can enter.
        scratch = tempfile.mkdtemp(prefix="sbx-test-scratch-")
        os.chmod(scratch, 0o755)
    (sites_dir / f"{name}.yaml").write_text(f"""
name: {name}
scheduler: slurm
scratch_root: {scratch}
slurm:
  partition: {partition}
  walltime: "{walltime}"
  drain_seconds: {drain}
  job_name_prefix: sbxt
{f"  max_array_size: {max_array}" if max_array else ""}
{slurm_keys}
pool:
  max_workers: {max_workers}
  max_queued_jobs: {queued}
  max_submissions_per_minute: {per_minute}
  poll_seconds: 1
  idle_seconds: 3
""")


@pytest.fixture
def slurm_env(sbx_env, slurm, tmp_path):
    env = dict(sbx_env, SCALEBOX_SITES_DIR=str(tmp_path / "sites"), SLURM_CONF=slurm)
    return env


def cli(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def start(env, *args):
    return subprocess.Popen([sys.executable, "-m", "scalebox_hpc", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_app_primes_runs_in_slurm_jobs_on_two_nodes(slurm_env, dsn, tmp_path):
    write_site(tmp_path / "sites")
    proc = cli(dict(slurm_env, PRIMES_MAX="20000", RANGE_SIZE="500", GATHER_DIR=str(tmp_path)),
               "run", "--json", "--site", "testcluster", EXAMPLES / "app-primes")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED" and summary["result"] == "2262"
    rows = query(dsn, "SELECT DISTINCT w.host, w.slurm_job_id IS NOT NULL FROM task_exec e "
                      "JOIN workers w ON w.id = e.worker_id JOIN tasks t ON t.id = e.task_id "
                      "JOIN modules m ON m.id = t.module_id WHERE m.name = 'calc'")
    assert {host for host, _ in rows} == {"n1", "n2"}, rows
    assert all(has_job for _, has_job in rows)


def test_cancelled_worker_job_loses_nothing(slurm_env, dsn, tmp_path):
    write_site(tmp_path / "sites")
    proc = start(dict(slurm_env, WORK_SECONDS="1"), "run", "--json", "--site", "testcluster", ROUTING_APP)
    app_id = wait_for(lambda: (query(dsn, "SELECT max(id) FROM apps") or [[None]])[0][0], what="app")
    worker_id, _pid = wait_for(lambda: held_worker(dsn, app_id), timeout=120, what="a running task")
    (job,), = query(dsn, "SELECT slurm_job_id FROM workers WHERE id = %s", worker_id)
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=slurm_env, check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_routed_once(dsn, app_id)
    # Whether the worker lived to record the interrupted attempt itself or the controller
    # found its lease run out, the attempt counts as lost (123) and was retried.
    (lost,), = query(dsn, "SELECT count(*) FROM task_exec WHERE worker_id = %s AND status_code = 123", worker_id)
    assert lost >= 1
    (status,), = query(dsn, "SELECT status FROM workers WHERE id = %s", worker_id)
    assert status in ("LOST", "EXITED")


def test_walltime_drain_loses_no_attempt(slurm_env, dsn, tmp_path):
    """Jobs of one minute, tasks of 20 s: workers stop claiming what will not fit,
    hand back unstarted tasks for free, and new jobs take over until the app is done."""
    write_site(tmp_path / "sites", walltime="1", drain=30, max_workers=2)
    n = 8
    app = tmp_path / "app"
    app.mkdir()
    (app / "code").mkdir()
    (app / "code" / "work.sh").write_text("#!/bin/bash\nsleep 20\n")
    (app / "code" / "work.sh").chmod(0o755)
    (app / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(n)))
    (app / "app.yaml").write_text("name: walltime\nmodules:\n  w:\n    base_image: host\n    code_path: ./code\n"
                                  "    command: ./work.sh\n    start_task: FILE:bodies.txt\n    slots: 2\n"
                                  "    task_max_seconds: 25\n")
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app, timeout=900)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    codes = query(dsn, "SELECT e.status_code, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                       "WHERE t.app_id = %s GROUP BY 1", app_id)
    assert codes == [(0, n)], f"attempts lost to the walltime: {codes}"
    jobs = query(dsn, "SELECT count(DISTINCT slurm_job_id) FROM workers")[0][0]
    assert jobs > 2, "the drained pool was not replaced"
    drained = query(dsn, "SELECT count(*) FROM workers WHERE message LIKE 'walltime%%' "
                         "OR message LIKE 'drained on SIGUSR1%%'")[0][0]
    assert drained >= 1


def test_rate_limit_and_degraded_site(slurm_env, dsn, tmp_path):
    # Six workers wanted, arrays of at most 2, 2 sbatch calls a minute: 4 workers at first.
    write_site(tmp_path / "sites", name="slow", per_minute=2, max_workers=6, max_array=2)
    write_site(tmp_path / "sites", name="broken", partition="later")
    app = tmp_path / "app"
    (app / "code").mkdir(parents=True)
    (app / "code" / "nap.sh").write_text('#!/bin/sh\nexec sleep "$1"\n')
    (app / "code" / "nap.sh").chmod(0o755)
    (app / "app.yaml").write_text(
        "name: limits\nmodules:\n"
        "  a:\n    base_image: host\n    code_path: ./code\n    command: ./nap.sh\n    start_task: FILE:bodies.txt\n"
        "    slots: 6\n    site: slow\n"
        "  b:\n    base_image: host\n    command: /bin/true\n    start_task: x\n    site: broken\n")
    (app / "bodies.txt").write_text("".join(f"{5 + i}\n" for i in range(6)))
    ctl = start(slurm_env, "-v", "controller")
    try:
        sub = cli(slurm_env, "submit", "--json", app)
        assert sub.returncode == 0, sub.stderr
        app_id = json.loads(sub.stdout)["id"]
        time.sleep(12)
        calls, workers = query(dsn, "SELECT count(DISTINCT split_part(slurm_job_id, '_', 1)), count(slurm_job_id) "
                                    "FROM workers WHERE site = 'slow'")[0]
        assert (calls, workers) == (2, 4), f"{calls} sbatch calls for {workers} workers in the first minute"

        def site(name):
            return {s["name"]: s for s in json.loads(cli(slurm_env, "site", "list", "--json").stdout)}[name]

        broken = site("broken")
        assert broken["status"] == "DEGRADED" and "later" in broken["reason"], broken
        # The site works again once its partition exists: it recovers by itself.
        subprocess.run(["scontrol", "create", "partitionname=later", "nodes=n[1-2]", "state=up"],
                       env=slurm_env, check=True)
        wait_for(lambda: site("broken")["status"] == "OK"
                 and query(dsn, "SELECT status FROM tasks t JOIN modules m ON m.id = t.module_id "
                                "WHERE m.name = 'b'")[0][0] == 0, timeout=240, interval=2, what="recovery")
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "FINISHED",
                 timeout=240, interval=1, what="app FINISHED")
        assert query(dsn, "SELECT status, count(*) FROM tasks WHERE app_id = %s GROUP BY 1", app_id) == [(0, 7)]
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)
        subprocess.run(["scontrol", "delete", "partitionname=later"], env=slurm_env)


def test_site_check(slurm_env, tmp_path):
    """A probe job built like a worker job reaches the database from a node; a site whose
    nodes cannot reach it, or whose partition is missing, is reported not ready."""
    write_site(tmp_path / "sites")
    write_site(tmp_path / "sites", name="nodb")
    with open(tmp_path / "sites" / "nodb.yaml", "a") as fh:
        fh.write('database:\n  dsn: "host=/nonexistent dbname=x"\n')
    write_site(tmp_path / "sites", name="nopart", partition="nosuchpartition")

    good = cli(slurm_env, "site", "check", "--json", "testcluster", timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    checks = {c["name"]: c for c in json.loads(good.stdout)["checks"]}
    assert all(c["ok"] for c in checks.values())
    assert checks["database from nodes"]["detail"].split()[-1] in ("n1", "n2")

    nodb = cli(slurm_env, "site", "check", "--json", "nodb", timeout=120)
    assert nodb.returncode == 1
    probe = {c["name"]: c for c in json.loads(nodb.stdout)["checks"]}["probe job"]
    assert not probe["ok"] and "/nonexistent" in probe["detail"], probe

    nopart = cli(slurm_env, "site", "check", "nopart", timeout=120)
    assert nopart.returncode == 1 and "site nopart: NOT ready" in nopart.stdout
    nopart = json.loads(cli(slurm_env, "site", "check", "--json", "nopart", timeout=120).stdout)
    assert nopart["checks"][-1]["name"] == "partition"
    assert "nosuchpartition not found" in nopart["checks"][-1]["detail"]


def test_local_pipeline_reads_each_file_on_the_node_that_wrote_it(slurm_env, dsn, tmp_path):
    # Each fake node gets a scratch of its own (they share one machine): a file left in
    # DATA_DIR on n1 is then not on n2, as on a real cluster.
    write_site(tmp_path / "sites", max_workers=4, scratch=f"{tmp_path}/node-$SLURMD_NODENAME")
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", EXAMPLES / "local-pipeline")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED", summary
    assert summary["modules"]["consume"]["ok"] == 8, summary
    rows = query(dsn, PIPELINE_HOSTS, summary["id"])
    assert len(rows) == 8
    assert all(made == used and read == 50 << 20 for _, made, used, read in rows), rows
    assert {made for _, made, _, _ in rows} == {"n1", "n2"}, rows
    # Each worker sent (--nodelist) to a node ran there (pilots already on a node serve
    # its consume tasks too, so there may be none).
    sent = query(dsn, "SELECT w.want_host, w.host FROM workers w WHERE w.want_host IS NOT NULL "
                      "AND w.host IS NOT NULL")
    assert all(want == host for want, host in sent), sent
    assert not list(tmp_path.glob("node-*/scalebox-data/*/*.bin"))   # consumed, removed


NODE_DOWN_APP = """name: node-down
modules:
  emit:
    base_image: host
    code_path: ./code
    command: ./emit.sh
    start_task: go
  pin:
    base_image: host
    code_path: ./code
    command: ./show.sh
    task_dist_mode: HOST-BOUND
  roam:
    base_image: host
    code_path: ./code
    command: ./show.sh
    task_dist_mode: HOST-BOUND
    host_fallback: anywhere
"""

EMIT_AND_SHOW = {
    "emit.sh": """#!/bin/sh
cat > "$WORK_DIR/sink-tasks.txt" <<'EOF'
pin,a,{"to_host":"n2"}
roam,b,{"to_host":"n2"}
pin,c,{"to_host":"n9"}
EOF
""",
    "show.sh": """#!/bin/sh
echo "ran on $LOCAL_HOST with $2"
""",
}


def node_state(env, node):
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.split()[0] if out.stdout.split() else ""


@contextlib.contextmanager
def node_down(env, node):
    """Take a node down as an admin would. The test cluster's ReturnToService=2 brings a
    DOWN node back at its next ping, seconds later: keep setting it down until the end."""
    down = ["scontrol", "update", f"nodename={node}", "state=down", "reason=test"]
    subprocess.run(down, env=env, check=True)
    stop = threading.Event()

    def hold():
        while not stop.wait(0.3):
            subprocess.run(down, env=env, capture_output=True)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        yield
    finally:
        stop.set()
        holder.join()
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env)
        wait_for(lambda: node_state(env, node) in ("idle", "mixed", "allocated"), timeout=120, interval=1,
                 what=f"{node} back up")


def test_tasks_for_a_node_that_is_down_fail_or_run_anywhere(slurm_env, dsn, tmp_path):
    """n2 is down: a HOST-BOUND task sent there ends with -106 and a note (host_fallback:
    fail), or runs on n1 with the host it wanted in its headers (anywhere). A node the
    partition does not have is gone as well."""
    write_site(tmp_path / "sites")
    app = tmp_path / "app"
    (app / "code").mkdir(parents=True)
    for program, text in EMIT_AND_SHOW.items():
        (app / "code" / program).write_text(text)
        (app / "code" / program).chmod(0o755)
    (app / "app.yaml").write_text(NODE_DOWN_APP)
    with node_down(slurm_env, "n2"):
        proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    rows = query(dsn, "SELECT t.body, t.status, t.to_host, t.headers, e.status_code, e.note, e.stdout, w.host "
                      "FROM tasks t JOIN task_exec e ON e.task_id = t.id "
                      "LEFT JOIN workers w ON w.id = e.worker_id WHERE t.app_id = %s", app_id)
    by_body = {r[0]: r[1:] for r in rows}
    assert sorted(by_body) == ["a", "b", "c", "go"], rows
    status, to_host, _headers, code, note, _out, host = by_body["a"]
    assert (status, to_host, code, host) == (-106, "n2", -106, None)
    assert "to_host n2 is gone: node n2 is down (sinfo, reason: test)" in note
    status, to_host, _headers, code, note, _out, host = by_body["c"]
    assert (status, to_host, code, host) == (-106, "n9", -106, None)
    assert "node n9 is not in partition main" in note
    status, to_host, headers, code, _note, out, host = by_body["b"]
    assert (status, to_host, code, host) == (0, None, 0, "n1")
    assert headers["wanted_host"] == "n2" and "to_host" not in headers
    assert '"wanted_host": "n2"' in out



# -- pilots that fill a node (issue 11): partition 'big' is node n3, 4 CPUs and 2 fake GPUs.

def pilot_jobs(dsn, app_id):
    """The Slurm jobs whose pilots ran the app's attempts, and every worker job submitted."""
    ran = query(dsn, "SELECT DISTINCT w.slurm_job_id FROM task_exec e JOIN workers w ON w.id = e.worker_id "
                     "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", app_id)
    return [job for job, in ran], query(dsn, "SELECT count(*) FROM workers")[0][0]


@pytest.mark.parametrize("task_cpus, at_once", [(1, 4), (2, 2)])
def test_a_4_cpu_pilot_job_runs_what_fits_at_once(slurm_env, dsn, tmp_path, task_cpus, at_once):
    write_site(tmp_path / "sites", partition="big", max_workers=1, slurm_keys="  cpus_per_task: 4")
    app = write_app(tmp_path / "app", "name: fill\nmodules:\n" +
                    module_yaml("work", "nap.sh", slots=4, task_cpus=task_cpus, start_task="[a, b, c, d, e, f, g, h]"),
                    {"nap.sh": 'sleep 2; echo "omp=$OMP_NUM_THREADS"\n'})
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    rows = runs(dsn, app_id)
    assert len(rows) == 8
    assert max_overlap([(r[4], r[5]) for r in rows]) == at_once
    assert {r[6] for r in rows} == {f"omp={task_cpus}\n"} and {r[2] for r in rows} == {task_cpus}
    jobs, submitted = pilot_jobs(dsn, app_id)
    assert len(jobs) == 1 and submitted == 1, "one pilot job ran them all"
    assert query(dsn, "SELECT host, cpus FROM workers") == [("n3", 4)]


def test_gpu_tasks_in_a_slurm_pilot_see_their_own_gpus(slurm_env, dsn, tmp_path):
    write_site(tmp_path / "sites", partition="big", max_workers=1, slurm_keys='  cpus_per_task: 4\n  gpus: "2"')
    app = write_app(tmp_path / "app", "name: gpus\nmodules:\n" +
                    module_yaml("train", "gpu.sh", slots=2, task_gpus=1, start_task="[a, b]"),
                    {"gpu.sh": 'echo "cuda=$CUDA_VISIBLE_DEVICES rocr=$ROCR_VISIBLE_DEVICES"; sleep 2\n'})
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    rows = runs(dsn, app_id)
    assert max_overlap([(r[4], r[5]) for r in rows]) == 2, "both GPU tasks ran at once"
    # Slurm gave the job GPUs 0 and 1 (SLURM_JOB_GPUS); each task sees one, not the other's.
    assert sorted(r[6] for r in rows) == ["cuda=0 rocr=0\n", "cuda=1 rocr=1\n"]
    assert query(dsn, "SELECT gpus FROM workers") == [(2,)]


def test_a_3_module_pipeline_runs_in_one_pilot_job(slurm_env, dsn, tmp_path):
    # max_workers 3: the controller may submit more jobs; it must see that one holds all.
    write_site(tmp_path / "sites", partition="big", max_workers=3, slurm_keys="  cpus_per_task: 4")
    yaml = ("name: pipe\nmodules:\n" + module_yaml("scatter", "scatter.sh", sink_modules="[calc]", start_task="go") +
            module_yaml("calc", "calc.sh", slots=2, sink_modules="[gather]") + module_yaml("gather", "gather.sh"))
    app = write_app(tmp_path / "pipe", yaml, {
        "scatter.sh": 'for i in 1 2 3 4 5 6; do echo "$i" >> "$WORK_DIR/sink-tasks.txt"; done\n',
        "calc.sh": 'sleep 1; echo "sq-$(( $1 * $1 ))" > "$WORK_DIR/sink-tasks.txt"\n',
        "gather.sh": "echo got $1\n"})
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    assert sorted(r[6] for r in runs(dsn, app_id, "gather")) == sorted(f"got sq-{i * i}\n" for i in range(1, 7))
    jobs, submitted = pilot_jobs(dsn, app_id)
    assert len(jobs) == 1 and submitted == 1, f"later stages got their own sbatch: {jobs}, {submitted} workers"


def test_walltime_drain_of_a_pilot_with_4_lanes_running(slurm_env, dsn, tmp_path):
    """One-minute jobs of 4 lanes, tasks of 30 s (task_max_seconds 35): the first job runs
    4, claims nothing that would outlive its walltime (a second round cannot fit), drains
    on USR1; the next job runs the other 4."""
    write_site(tmp_path / "sites", partition="big", walltime="1", drain=30, max_workers=1,
               slurm_keys="  cpus_per_task: 4")
    app = write_app(tmp_path / "app", "name: drain\nmodules:\n" +
                    module_yaml("w", "work.sh", slots=4, task_max_seconds=35,
                                start_task="[t0, t1, t2, t3, t4, t5, t6, t7]"),
                    {"work.sh": "sleep 30\n"})
    proc = cli(slurm_env, "run", "--json", "--site", "testcluster", app, timeout=900)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    codes = query(dsn, "SELECT e.status_code, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                       "WHERE t.app_id = %s GROUP BY 1", app_id)
    assert codes == [(0, 8)], f"attempts lost to the walltime: {codes}"
    per_job = query(dsn, "SELECT w.slurm_job_id, count(*) FROM task_exec e JOIN workers w ON w.id = e.worker_id "
                         "GROUP BY 1 ORDER BY 1")
    assert len(per_job) >= 2 and max(n for _, n in per_job) <= 4, per_job
    rows = runs(dsn, app_id)
    assert max_overlap([(r[4], r[5]) for r in rows]) == 4, "the pilot ran 4 lanes at once"
    drained = query(dsn, "SELECT count(*) FROM workers WHERE message LIKE 'walltime%%' "
                         "OR message LIKE 'drained on SIGUSR1%%'")[0][0]
    assert drained >= 1
